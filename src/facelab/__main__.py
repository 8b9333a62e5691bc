import sys

from facelab.cli import main

sys.exit(main())
