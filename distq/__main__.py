import sys

from distq.cli import main

sys.exit(main())
