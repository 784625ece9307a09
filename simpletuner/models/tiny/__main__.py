from simpletuner.models.tiny import main

raise SystemExit(main())
