import sys

from cluster.sim.run import main

sys.exit(main())
