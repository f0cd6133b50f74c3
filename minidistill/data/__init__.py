"""Data for distillation: instruction sets (SFT / prompts for generation, ``instructions.py``) and
plain-text corpora (``corpus.py``); ``files.py`` reads JSON/JSONL with file:line errors and
``tokens.py`` holds the tokenizer helpers both use. Import from here: ``from minidistill import data``.

Instruction records (JSONL, JSON list, or a ``datasets`` hub name) come in three shapes:

* Dolly / MiniLLM: ``instruction``, ``input`` or ``context`` (may be empty), ``output`` or
  ``response`` (a string, or a list of reference strings; the first is the training target),
  optionally a pre-rendered ``prompt``.
* Chat: ``messages`` = [{role, content}, ...] ending with an assistant turn, which is the
  response; the earlier turns are the prompt.
* Self-Instruct seed tasks: ``instruction`` + ``instances`` [{input, output}]; one example per
  instance.

Plain-text corpora (``load_texts``: files, globs, or directories, which contribute their ``.txt``
and ``.jsonl`` files recursively): ``.jsonl``/``.json`` documents come from a ``text`` field.
Any other file is read as UTF-8 text and split into documents by this rule: if the file contains
a blank (empty or whitespace-only) line, documents are the chunks between blank lines; otherwise
every non-empty line is one document. (``wiki_demo.txt``: one article per line -> 30 documents;
``tinyshakespeare.txt``: one speech per blank-line-separated chunk.)
"""

from __future__ import annotations

from minidistill.data.corpus import (  # noqa: F401
    TextList,
    corpus_fingerprint,
    load_texts,
    pack_blocks,
    split_blocks,
    split_documents,
)
from minidistill.data.files import (  # noqa: F401
    json_type,
    read_json_list,
    read_jsonl,
    read_lines,
)
from minidistill.data.instructions import (  # noqa: F401
    ALPACA_PREAMBLE,
    ALPACA_PREAMBLE_INPUT,
    IGNORE_INDEX,
    LONG_PROMPT_POLICIES,
    TEMPLATES,
    Example,
    TokenizeStats,
    collate_prompts,
    collate_sft,
    load_instructions,
    parse_record,
    render_alpaca,
    render_prompt,
    tokenize_prompts,
    tokenize_sft,
)
from minidistill.data.tokens import (  # noqa: F401
    encode_prompt,
    eos_id,
    special_affixes,
    tokenize_quiet,
    with_prefix,
)
