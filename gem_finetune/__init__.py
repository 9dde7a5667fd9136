"""gem_finetune: the ``gem-finetune`` experiment harness, kept apart from the gem_kernels library.

``data`` reads and batches a task, ``models`` builds the classifier, ``methods`` sets up and
trains each method, ``report`` measures and summarises, ``cli`` is the command line
(``gem-finetune`` or ``python -m gem_finetune``). Importing this package imports nothing heavy;
transformers, peft, matplotlib and tqdm load where they are used.
"""
