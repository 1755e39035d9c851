"""Turn the paths a user gives (PDFs, source trees, text files, `-` for stdin) into one Document.

Ingest is text-only: it never sees tokens. It records where each file (or PDF page) sits in the
text, so that later stages can say which source a passage or a truncation came from. It only reads.

Which files a folder walk reads. A folder is walked recursively in sorted order; hidden paths
(a leading '.'), paths a .gitignore ignores, and symlinked folders are always left out. The
`include` and `exclude` globs then follow .gitignore rules and are matched against each path
relative to the folder argument ('src/a.py' is 'a.py' when the user gave 'src'), so a glob without a
slash ('*.py', 'test_*') matches a name at any depth, a leading '/' anchors it to the folder, a
trailing '/' matches only folders, a matching folder matches everything inside it, and within one
option a later '!glob' re-admits what an earlier glob matched. With include globs, only files they
match are read; a file or folder an exclude glob matches is dropped (an excluded folder is not
entered), even if an include glob matches it. By default a walk also skips two kinds of generated
files, reporting them in one warning per folder: lock files (package-lock.json, yarn.lock,
pnpm-lock.yaml, poetry.lock, Cargo.lock, Gemfile.lock, composer.lock, uv.lock, Pipfile.lock, go.sum
and any *.lock) and minified files (*.min.js, *.min.css, *.map, and any .js, .mjs, .cjs or .json
file with a line of more than 1000 characters in its first 4 KiB, which hand-written code and
config rarely have). An include glob that matches such a file reads it after all. A path given
directly (not found by a walk) is always read: no glob and no default skip applies to it.

One idea per module:

- `read`: `read_documents`, the one entry point, from the user's paths to a Document.
- `walk`: the arguments expanded into files to read (folder walks, .gitignore, the globs).
- `globs`: the include and exclude globs, checked and compiled.
- `entry`: one file or stdin read into parts (binary sniffing, default skips, decoding).
- `encoding`: the encoding of text that is not UTF-8, detected (charset-normalizer).
- `pdf`: a PDF read into one part per page.
- `document`: `Document` and `Source`, and the parts joined into a Document with source spans.
- `log`: the warnings and skipped files gathered while reading, and the messages about them.
"""

from __future__ import annotations

from ..errors import InputError
from .document import Document, Source
from .entry import (
    BINARY_EXTENSIONS,
    BINARY_SNIFF_BYTES,
    CODE_EXTENSIONS,
    CODE_FILENAMES,
    LOCK_FILENAMES,
    MINIFIED_LINE_CHARS,
    MINIFIED_SNIFF_BYTES,
    MINIFIED_SNIFF_EXTENSIONS,
    MINIFIED_SUFFIXES,
    STDIN_NAME,
    TEXT_EXTENSIONS,
)
from .read import read_documents

__all__ = [
    "BINARY_EXTENSIONS",
    "BINARY_SNIFF_BYTES",
    "CODE_EXTENSIONS",
    "CODE_FILENAMES",
    "LOCK_FILENAMES",
    "MINIFIED_LINE_CHARS",
    "MINIFIED_SNIFF_BYTES",
    "MINIFIED_SNIFF_EXTENSIONS",
    "MINIFIED_SUFFIXES",
    "STDIN_NAME",
    "TEXT_EXTENSIONS",
    "Document",
    "InputError",
    "Source",
    "read_documents",
]
