"""Structured outputs: constrained decoding with llguidance (docs/structured-outputs.md).

    spec.py       StructuredOutput: what a request asks for (torch-free, no grammar library)
    grammar.py    a spec as an llguidance grammar, and the check that refuses what cannot be enforced
                  (torch-free: the gateway checks with it before admission)
    compiler.py   GrammarCompiler: the tokenizer's llguidance view, an LRU of compiled grammars by
                  content, a compile pool off the engine thread
    matcher.py    GrammarState: one sequence's matcher (advance, roll back, fork, termination)
    masks.py      MaskFiller: every constrained row's token mask, filled while the step's forward runs
"""
