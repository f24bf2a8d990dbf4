"""Training: the loop (``trainer``), step budgets (``budget``), the learning-rate schedule
(``schedule``) and the processes of a distributed run (``distributed``). The command that reads
the options and builds the parts is ``model.train``; the data is ``model.data``."""
