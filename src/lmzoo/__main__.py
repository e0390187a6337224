import sys

from lmzoo.cli.app import main

sys.exit(main())
