"""DVC stage `teacher_cache`: build or resume the teacher cache at the path dvc.yaml names.

The output is `persist: true` in dvc.yaml, so DVC leaves a partial store in place and a rerun
resumes it. When params name another teacher or dataset, the store at that path was built for
other params: the stage replaces it (`--replace`), which loses nothing under DVC, since the
previous version is in DVC's cache (`git checkout` + `dvc checkout` bring it back).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["teacher-cache", "--replace", *sys.argv[1:]])
