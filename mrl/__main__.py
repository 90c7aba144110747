from mrl.cli import main

raise SystemExit(main())
