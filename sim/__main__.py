import sys

from sim.run import main

sys.exit(main())
