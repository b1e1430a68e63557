"""DVC stage `evaluate`: zero-shot mIoU of the student and the baseline, metrics JSON and pictures."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["evaluate", "--quiet", *sys.argv[1:]])
