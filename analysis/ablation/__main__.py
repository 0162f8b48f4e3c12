import sys

from analysis.ablation.launch import main

sys.exit(main())
