from samout.cli import main

raise SystemExit(main())
