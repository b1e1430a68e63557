"""DVC stage `train`: train the student from the teacher cache into the folder dvc.yaml names.

`models/student` is `persist: true`, so after a crash `dvc repro` resumes from its checkpoint
(`--auto-resume`); a checkpoint made with other params or another cache is not resumed, and
training starts afresh (DVC's cache keeps the previous model).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["train", "--auto-resume", *sys.argv[1:]])
