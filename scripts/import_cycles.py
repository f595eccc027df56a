#!/usr/bin/env python3
"""Print the import cycles between the files of each folder under `src/`.

Usage: python3 scripts/import_cycles.py [--root src] [--modules] [--edges] [--exclude DIR]...

For every folder under `src/` (and `src/` itself), the nodes of its graph are the files
directly in it: `x.rs` is the node `x`, `mod.rs` (or `lib.rs` for `src/`) the node `mod`.
A file `a.rs` that refers to its sibling `b` gives the edge `a -> b`. A reference is a path,
in a `use` declaration or anywhere in the code (attributes and macro bodies included), that
starts with `super::`, `self::`, `crate::` or `$crate::` and leads into the folder:

* `use super::b::X`, `super::b::f()`, `use crate::<folder path>::b::X`: an edge to `b`;
* `use super::X` / `crate::<folder path>::X` where `X` is not a sibling module but an item
  of the folder's `mod.rs`: an edge to the sibling `mod.rs` re-exports `X` from
  (`pub use self::b::X` gives `b`), or to `mod` if `X` is defined in `mod.rs` itself;
* in `mod.rs`, `use self::b::X` (a private import) and `self::b::f()`: an edge to `b`.

Not edges: `mod b;` declarations; re-exports in `mod.rs` (`pub use self::b::X`,
`pub(crate) use ...`); comments (doc links included) and string literals; plain relative
paths (`b::X` without `self::`) and bare names, which are not resolved. Inline modules
(`mod tests { use super::*; }`) are followed, so a file's own test module referring to the
file is not an edge. Subfolders are not nodes of their parent's graph unless `--modules`
is given: then a subfolder `sub/` is one node, with the references of every file under it.

Every elementary cycle is printed, each edge with the first reference that makes it
(`file:line path`). `--edges` prints every folder's edges too. `--exclude DIR` (repeatable,
one folder relative to the root, e.g. `guard`; not its subfolders) leaves that folder's
cycles out of the exit status.
The exit status is 1 if a cycle was found outside the excluded folders, else 0.
"""

import argparse
import os
import re
import sys

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
VIS_WORDS = {"pub"}


def tokenize(src):
    """Tokens of Rust source as (text, line): identifiers, `::`, punctuation. Comments,
    strings and char literals are dropped."""
    toks = []
    i, n, line = 0, len(src), 1
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += src[i] == "\n"
                    i += 1
        elif (c in "rb" and re.match(r'(br|r|b)?#*"', src[i:i + 20])) or c == '"':
            m = re.match(r'(br|r|b)?(#*)"', src[i:])
            raw = "r" in (m.group(1) or "")
            close = '"' + m.group(2)
            j = i + m.end()
            while j < n:
                if not raw and src[j] == "\\":
                    j += 2
                    continue
                if src.startswith(close, j):
                    j += len(close)
                    break
                j += 1
            line += src.count("\n", i, j)
            i = j
        elif c == "'" or (c == "b" and src.startswith("b'", i)):
            # A char literal, or a lifetime / label (`'a`), which is skipped as one token.
            start = i + (2 if c == "b" else 1)
            m = re.match(r"(\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'])'", src[start:])
            if m:
                i = start + m.end()
            else:
                m = IDENT.match(src, start)
                i = m.end() if m else start
        elif src.startswith("::", i):
            toks.append(("::", line))
            i += 2
        elif c == "$" and src.startswith("$crate", i):
            toks.append(("$crate", line))
            i += 6
        elif IDENT.match(src, i) and (c.isalpha() or c == "_"):
            m = IDENT.match(src, i)
            toks.append((m.group(0), line))
            i = m.end()
        else:
            toks.append((c, line))
            i += 1
    return toks


def parse_use_tree(toks, i, prefix, out):
    """Parses a use tree at toks[i]; appends (path, alias) to out; returns the index after."""
    path = list(prefix)
    while i < len(toks):
        t = toks[i][0]
        if t == "{":
            i += 1
            while toks[i][0] != "}":
                i = parse_use_tree(toks, i, path, out)
                if toks[i][0] == ",":
                    i += 1
            return i + 1
        if t == "*":
            out.append((path + ["*"], None))
            return i + 1
        if t == "::":
            i += 1
            continue
        if IDENT.fullmatch(t) or t == "$crate":
            path.append(t)
            i += 1
            if i < len(toks) and toks[i][0] == "as":
                out.append((path, toks[i + 1][0]))
                return i + 2
            if i < len(toks) and toks[i][0] == "::":
                continue
            out.append((path, None))
            return i
        return i
    return i


class FileRefs:
    """The absolute paths a file refers to, with where, and its `pub use` re-exports."""

    def __init__(self, modpath, src):
        self.refs = []  # (absolute path, line, text, in_reexport)
        toks = tokenize(src)
        scopes = []  # (inline module name, brace depth at which it closes)
        depth = 0
        i = 0
        while i < len(toks):
            t, line = toks[i]
            here = modpath + [s[0] for s in scopes]
            if t == "mod" and i + 2 < len(toks) and toks[i + 2][0] == "{":
                scopes.append((toks[i + 1][0], depth))
                depth += 1
                i += 3
                continue
            if t == "{":
                depth += 1
            elif t == "}":
                depth -= 1
                if scopes and scopes[-1][1] == depth:
                    scopes.pop()
            elif t == "use" and (i == 0 or toks[i - 1][0] not in ("::",)):
                reexport = self._is_pub(toks, i)
                trees = []
                j = parse_use_tree(toks, i + 1, [], trees)
                for path, alias in trees:
                    self._add(here, path, line, reexport, alias)
                while j < len(toks) and toks[j][0] != ";":
                    j += 1
                i = j + 1
                continue
            elif t in ("super", "self", "crate", "$crate") and (
                i + 1 < len(toks) and toks[i + 1][0] == "::"
            ) and (i == 0 or toks[i - 1][0] != "::"):
                path, j = [t], i + 1
                while j + 1 < len(toks) and toks[j][0] == "::" and (
                    IDENT.fullmatch(toks[j + 1][0])
                ):
                    path.append(toks[j + 1][0])
                    j += 2
                self._add(here, path, line, False, None)
                i = j
                continue
            i += 1

    @staticmethod
    def _is_pub(toks, i):
        # `pub use`, `pub(crate) use`, `pub(super) use`, `pub(in path) use`.
        k = i - 1
        if k >= 0 and toks[k][0] == ")":
            while k >= 0 and toks[k][0] != "(":
                k -= 1
            k -= 1
        return k >= 0 and toks[k][0] in VIS_WORDS

    def _add(self, here, path, line, reexport, alias):
        text = "::".join(path)
        head = path[0]
        if head in ("crate", "$crate"):
            absolute = path[1:]
        elif head == "super":
            base = list(here)
            k = 0
            while k < len(path) and path[k] == "super":
                if not base:
                    return
                base.pop()
                k += 1
            absolute = base + path[k:]
        elif head == "self":
            absolute = list(here) + path[1:]
        else:
            return
        # `use a::b::{self}` names `a::b`.
        if absolute and absolute[-1] == "self":
            absolute = absolute[:-1]
        self.refs.append((absolute, line, text, reexport, alias))


def module_path(root, path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return rel


def cycles_of(graph):
    """Every elementary cycle, each once, starting at its smallest node."""
    found = []
    nodes = sorted(graph)
    for start in nodes:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ()), reverse=True):
                if nxt == start:
                    found.append(path + [start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return sorted(found, key=lambda c: (len(c), c))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="src")
    ap.add_argument("--modules", action="store_true", help="subfolders are nodes too")
    ap.add_argument("--edges", action="store_true", help="print every edge")
    ap.add_argument("--exclude", action="append", default=[], help="folder to not fail on")
    args = ap.parse_args()
    root = args.root.rstrip("/")

    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".rs"):
                p = os.path.join(dirpath, name)
                with open(p, encoding="utf-8") as f:
                    files[p] = FileRefs(module_path(root, p), f.read())

    any_cycle = False
    for folder in sorted({os.path.dirname(p) for p in files}):
        rel = os.path.relpath(folder, root)
        prefix = [] if rel == "." else rel.split(os.sep)
        mod_file = None
        for cand in ("mod.rs", "lib.rs", "main.rs"):
            if os.path.join(folder, cand) in files:
                mod_file = os.path.join(folder, cand)
                break
        if mod_file is None:
            continue
        children = {}
        for p in files:
            if os.path.dirname(p) == folder and p != mod_file:
                children[os.path.basename(p)[:-3]] = p
        subdirs = {
            d
            for d in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, d, "mod.rs"))
        }

        # What mod.rs re-exports: name -> sibling node (or None when from outside).
        reexports = {}
        for absolute, _, _, reexport, alias in files[mod_file].refs:
            if not reexport or absolute[: len(prefix)] != prefix:
                continue
            rest = absolute[len(prefix):]
            if len(rest) >= 2 and rest[-1] != "*":
                target = rest[0] if rest[0] in children else None
                if rest[0] in subdirs and args.modules:
                    target = rest[0] + "/"
                reexports[alias or rest[-1]] = target

        def node_of(p):
            if p == mod_file:
                return "mod"
            if os.path.dirname(p) == folder:
                return os.path.basename(p)[:-3]
            if args.modules:
                sub = os.path.relpath(p, folder).split(os.sep)[0]
                if not sub.startswith("..") and sub in subdirs:
                    return sub + "/"
            return None

        edges = {}
        for p, refs in files.items():
            src_node = node_of(p)
            if src_node is None:
                continue
            for absolute, line, text, reexport, _ in refs.refs:
                if p == mod_file and reexport:
                    continue
                if absolute[: len(prefix)] != prefix:
                    continue
                rest = absolute[len(prefix):]
                if not rest or rest[0] == "*":
                    target = "mod"
                elif rest[0] in children:
                    target = rest[0]
                elif rest[0] in subdirs:
                    target = rest[0] + "/" if args.modules else None
                elif rest[0] in reexports:
                    target = reexports[rest[0]]
                else:
                    target = "mod"
                if target is None or target == src_node:
                    continue
                where = f"{os.path.relpath(p)}:{line} {text}"
                edges.setdefault(src_node, {}).setdefault(target, where)

        graph = {a: set(bs) for a, bs in edges.items()}
        label = rel if rel != "." else "(root)"
        if args.edges:
            for a in sorted(edges):
                for b in sorted(edges[a]):
                    print(f"{label}: {a} -> {b}    ({edges[a][b]})")
        for cycle in cycles_of(graph):
            excluded = any(rel == e.rstrip("/") for e in args.exclude)
            any_cycle |= not excluded
            print(f"{label}: cycle {' -> '.join(cycle)}{'  (excluded)' if excluded else ''}")
            for a, b in zip(cycle, cycle[1:]):
                print(f"    {a} -> {b}: {edges[a][b]}")
    return 1 if any_cycle else 0


if __name__ == "__main__":
    sys.exit(main())
