import sys

from blade.cli import main

sys.exit(main())
