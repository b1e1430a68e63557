"""DVC stage `demo_data`: write the built-in synthetic scenes where dvc.yaml says."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["demo-data", *sys.argv[1:]])
