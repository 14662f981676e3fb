"""A run's life on disk and its control.

checks.py      start checks: option ranges, the output dir, the jobs dir, memory, what a resume may change
outdir.py      the output dir's lock, and folders published whole (final/, tokenizer/)
staging.py     a start's tokenizer, moved into tokenizer/ only once the start is valid
checkpoint.py  crash-safe, layout-independent checkpoints (`Checkpointer`)
state.py       the run state a checkpoint holds, resumed, saved and rolled back (`RunState`, `TrainState`)
replace.py     --init-model --overwrite-output-dir: the old run set aside until the new one has a checkpoint
policy.py      the step-boundary decision: divergence guard, job control, signals, agreement across ranks
divergence.py  the divergence detector (two loss EMAs)
jobs.py        job control: a per-user socket each run listens on; control.py is its command line
"""
