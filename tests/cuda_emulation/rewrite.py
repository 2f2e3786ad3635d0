"""Source rewrite of the project's CUDA files for the CPU emulation (see runtime/cuda_emu.h).

Three constructs change; everything else compiles as it is, against real ATen on CPU tensors:

- ``kernel<...><<<grid, block[, smem[, stream]]>>>(args)`` becomes a call of ``cuda_emu::launch``
  with the kernel's name and the launch's file and line;
- ``__shared__ T name[...];`` becomes a reference to the running block's storage
  (``cuda_emu::block_shared<T[...]>(site)``), ``extern __shared__ T name[];`` a pointer to the
  launch's dynamic shared memory;
- ``TORCH_LIBRARY_IMPL(ns, CUDA, m)`` registers the same functions as the CPU kernels of the library
  ``ns_emu`` (and ``TORCH_LIBRARY(ns, m)``, in the schema file, defines ``ns_emu``).

Every rewritten file starts with ``#line 1 "<original path>"`` and keeps its line breaks, so
compiler errors and the emulator's reports point at the original file and line. A construct the
emulation does not support stops the rewrite with :class:`RewriteError` naming it, its file and
its line.
"""

from __future__ import annotations

import re
from pathlib import Path

EMULATED_SUFFIX = "_emu"

# Constructs the emulator cannot run, with why (checked on code outside comments and strings).
UNSUPPORTED = {
    "__constant__": "__constant__ memory",
    "__managed__": "managed memory",
    "asm": "inline PTX (asm)",
    "cudaMalloc": "cudaMalloc (allocate through ATen instead)",
    "cudaMemcpy": "cudaMemcpy (copy through ATen instead)",
    "cudaMemcpyAsync": "cudaMemcpyAsync (copy through ATen instead)",
    "cudaLaunchKernel": "cudaLaunchKernel (use the <<<...>>> syntax)",
    "cudaLaunchCooperativeKernel": "cooperative launches",
    "cooperative_groups": "cooperative groups",
    "cudaFuncSetAttribute": "cudaFuncSetAttribute (opt-in shared memory)",
    "__nanosleep": "__nanosleep",
    "clock64": "clock64",
}


class RewriteError(ValueError):
    """A construct in a CUDA source that the emulation does not support."""


def _mask(text: str) -> str:
    """``text`` with comments and the contents of string/char literals blanked (same length and
    line breaks), so that constructs are searched in code only."""
    out = list(text)

    def blank(begin: int, end: int) -> None:
        for k in range(begin, min(end, len(text))):
            if out[k] != "\n":
                out[k] = " "

    i, n = 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif text[i] in "\"'" and not (text[i] == "'" and i > 0 and text[i - 1].isalnum()):
            quote, j = text[i], i + 1  # (a ' after a digit is a digit separator)
            while j < n and text[j] != quote and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            blank(i + 1, j)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _fail(path: str, text: str, pos: int, message: str) -> None:
    raise RewriteError(f"{path}:{_line_of(text, pos)}: {message}")


def _match_forward(masked: str, start: int, opening: str, closing: str) -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(masked)):
        if masked[i] == opening:
            depth += 1
        elif masked[i] == closing:
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _split_top_level(text: str) -> list[str]:
    """The comma-separated items of ``text`` outside (), [], {} and <> (empty items dropped)."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += (ch in "([{<") - (ch in ")]}>")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _kernel_start(masked: str, end: int) -> int:
    """Start of the kernel expression (name with optional template arguments) ending at ``end``."""
    i = end
    while i > 0 and masked[i - 1].isspace():
        i -= 1
    if i > 0 and masked[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            ch = masked[i]
            if ch == ">":
                depth += 1
            elif ch == "<":
                depth -= 1
                if depth == 0:
                    break
        else:
            return -1
        while i > 0 and masked[i - 1].isspace():
            i -= 1
    while i > 0 and (masked[i - 1].isalnum() or masked[i - 1] in "_:"):
        i -= 1
    return i


def _rewrite_launches(path: str, text: str) -> str:
    pieces, cursor = [], 0
    masked = _mask(text)
    for found in re.finditer(r"<<<", masked):
        open_pos = found.start()
        if open_pos < cursor:
            continue
        start = _kernel_start(masked, open_pos)
        kernel = text[start:open_pos].strip()
        if start < 0 or not re.match(r"[A-Za-z_]", kernel):
            _fail(path, text, open_pos, "kernel launch whose kernel expression cannot be parsed")
        close = masked.find(">>>", open_pos + 3)
        if close < 0:
            _fail(path, text, open_pos, "kernel launch without a closing >>>")
        config = _split_top_level(text[open_pos + 3 : close])
        if not 2 <= len(config) <= 4:
            _fail(path, text, open_pos, f"kernel launch with {len(config)} configuration values")
        config += ["0", "cudaStream_t{}"][len(config) - 2 :]
        paren = close + 3
        while paren < len(masked) and masked[paren].isspace():
            paren += 1
        if paren >= len(masked) or masked[paren] != "(":
            _fail(path, text, open_pos, "kernel launch without an argument list")
        args_end = _match_forward(masked, paren, "(", ")")
        if args_end < 0:
            _fail(path, text, open_pos, "kernel launch with unbalanced parentheses")
        args = text[paren + 1 : args_end - 1]
        name = " ".join(kernel.split()).replace("\\", "\\\\").replace('"', '\\"')
        head = (
            f'::cuda_emu::launch(::cuda_emu::LaunchSite{{"{name}", __FILE__, __LINE__}}, '
            f"{', '.join(config)}, &{kernel}"
        )
        call = head + (", " + args if args.strip() else "") + ")"
        # Keep the line count: the removed text's line breaks go after the call.
        removed = text[start:paren] + text[args_end - 1 : args_end]
        pieces += [text[cursor:start], call, "\n" * removed.count("\n")]
        cursor = args_end
    pieces.append(text[cursor:])
    return "".join(pieces)


_SHARED = re.compile(
    r"(?P<prefix>(?:\b(?:extern|static|volatile)\s+|\b(?:alignas|__align__)\s*\([^()]*\)\s*)*)"
    r"\b__shared__\b(?P<decl>[^;{}]*);"
)


def _rewrite_shared(path: str, text: str) -> str:
    masked = _mask(text)
    pieces, cursor = [], 0
    for found in _SHARED.finditer(masked):
        pos = found.start()
        prefix = found.group("prefix")
        decl = text[found.start("decl") : found.end("decl")]
        # alignas/__align__ may also follow __shared__; storage is 64-byte aligned anyway.
        decl = re.sub(r"\b(?:alignas|__align__)\s*\([^()]*\)", " ", decl).strip()
        if "=" in decl:
            _fail(path, text, pos, "__shared__ declaration with an initializer")
        if len(_split_top_level(decl)) > 1:
            _fail(path, text, pos, "__shared__ declaration of several variables")
        parsed = re.fullmatch(
            r"(?P<type>.*?[\w>*&\s])\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(\[[^\]]*\]\s*)*)",
            decl,
            re.S,
        )
        if parsed is None or not parsed.group("type").strip():
            _fail(path, text, pos, f"__shared__ declaration that cannot be parsed: {decl!r}")
        type_, name, dims = parsed.group("type").strip(), parsed.group("name"), parsed.group("dims")
        site = f"{Path(path).name}:{_line_of(text, pos)} {name}"
        if "extern" in prefix:
            if re.sub(r"\s", "", dims) != "[]":
                _fail(path, text, pos, "extern __shared__ declaration that is not an unsized array")
            new = f'{type_}* const {name} = ::cuda_emu::dynamic_shared<{type_}>("{site}");'
        else:
            if "[]" in re.sub(r"\s", "", dims):
                _fail(path, text, pos, "__shared__ array of unknown size that is not extern")
            qualifiers = " ".join(q for q in ("volatile",) if q in prefix)
            full_type = f"{qualifiers} {type_}{' ' + dims.strip() if dims.strip() else ''}".strip()
            new = f'auto& {name} = ::cuda_emu::block_shared<{full_type}>("{site}");'
        original = text[found.start() : found.end()]
        pieces += [text[cursor : found.start()], new, "\n" * original.count("\n")]
        cursor = found.end()
    pieces.append(text[cursor:])
    return "".join(pieces)


def _rewrite_registrations(path: str, text: str) -> str:
    masked = _mask(text)
    for found in re.finditer(r"\bTORCH_LIBRARY_IMPL\s*\(\s*(\w+)\s*,\s*(\w+)\s*,", masked):
        if found.group(2) != "CUDA":
            _fail(
                path, text, found.start(), f"TORCH_LIBRARY_IMPL for dispatch key {found.group(2)}"
            )
    return re.sub(
        r"\bTORCH_LIBRARY_IMPL\s*\(\s*(\w+)\s*,\s*CUDA\s*,",
        lambda m: f"TORCH_LIBRARY_IMPL({m.group(1)}{EMULATED_SUFFIX}, CPU,",
        text,
    )


def _check_supported(path: str, text: str) -> None:
    masked = _mask(text)
    for found in re.finditer(r"\b[A-Za-z_]\w*\b", masked):
        word = found.group()
        if word in UNSUPPORTED:
            _fail(
                path, text, found.start(), f"unsupported in the CUDA emulation: {UNSUPPORTED[word]}"
            )


def rewrite_cuda(text: str, path: str) -> str:
    """The emulation's version of one CUDA source or header (``path`` names it in #line)."""
    _check_supported(path, text)
    text = _rewrite_registrations(path, _rewrite_shared(path, _rewrite_launches(path, text)))
    return f'#line 1 "{path}"\n{text}'


def rewrite_schema(text: str, path: str) -> str:
    """The op schema file with ``TORCH_LIBRARY(ns, m)`` defining ``ns_emu`` instead."""
    if not re.search(r"\bTORCH_LIBRARY\s*\(", _mask(text)):
        raise RewriteError(f"{path}: no TORCH_LIBRARY block to rename")
    text = re.sub(
        r"\bTORCH_LIBRARY\s*\(\s*(\w+)\s*,",
        lambda m: f"TORCH_LIBRARY({m.group(1)}{EMULATED_SUFFIX},",
        text,
    )
    return f'#line 1 "{path}"\n{text}'


def rewrite_tree(csrc: Path, out: Path) -> list[Path]:
    """Mirror ``csrc`` into ``out`` for the emulation; returns the translation units to compile.

    CUDA files (.cu, .cuh) are rewritten, .cpp files that define a library (``TORCH_LIBRARY``: the
    op schemas) renamed, other headers copied with a #line directive; the remaining .cpp files (the
    CPU kernels, the Python module) are not part of the emulation.
    """
    units = []
    for source in sorted(csrc.rglob("*")):
        if not source.is_file() or source.suffix not in {".cu", ".cuh", ".h", ".cpp"}:
            continue
        text = source.read_text()
        is_schema = source.suffix == ".cpp" and re.search(r"\bTORCH_LIBRARY\s*\(", _mask(text))
        if source.suffix in {".cu", ".cuh"}:
            new = rewrite_cuda(text, str(source))
        elif is_schema:
            new = rewrite_schema(text, str(source))
        elif source.suffix == ".h":
            new = f'#line 1 "{source}"\n{text}'
        else:
            continue
        target = out / source.relative_to(csrc)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != new:
            target.write_text(new)
        if source.suffix == ".cu" or is_schema:
            units.append(target)
    return units
