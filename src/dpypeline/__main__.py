import sys

from dpypeline.cli import main

sys.exit(main())
