import sys

from tokenpacker_llava.demo.run import main

sys.exit(main())
