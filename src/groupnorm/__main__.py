from groupnorm.cli import main

raise SystemExit(main())
