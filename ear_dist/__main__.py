import sys

from ear_dist.cli import main

sys.exit(main())
