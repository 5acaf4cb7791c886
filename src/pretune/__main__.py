from pretune.cli import main
raise SystemExit(main())
