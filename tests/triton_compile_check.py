"""Compile every Triton kernel of mmsn's Triton backend for a GPU, without
one: the interpreter (TRITON_INTERPRET=1) checks what the kernels compute
but not that Triton's compiler accepts them, so this records the launches
the backend makes for a set of cases (on CPU tensors, launching nothing),
specializes their arguments the way triton's JIT does, and compiles each
distinct kernel with the installed triton and its bundled ptxas.

Usage (TRITON_INTERPRET unset)::

    python tests/triton_compile_check.py [--arch 90] [--resources] [--quick]

Prints one line per compiled variant (with registers and spills under
--resources) and exits 1 if any fails to compile. --quick leaves out the
ResNet-50 shapes (the same code with larger blocks), as the test does.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend

import mmsn.ops.backends.triton as triton_backend
from mmsn.ops.backends import triton_kernels, triton_launch

F32 = torch.float32


# (shape, layout, dtype, TritonBackend options): every layout, dtype and
# path, and the tiny tiles of tests/test_triton_backend.py (blocks of 1)
TINY = dict(tile=16, small_tile=2, min_programs=8)
CASES = [
    ((4, 6, 7, 5), 'nchw', F32, {}),
    ((4, 6, 7, 5), 'nchw', torch.bfloat16, {}),
    ((4, 6, 7, 5), 'channels_last', torch.float16, {}),
    ((2, 3, 64, 64), 'nchw', F32, dict(min_programs=1024)),  # split rows
    ((2, 5, 3, 3, 4), 'channels_last', F32, {}),
    ((8, 5), 'nchw', F32, {}),  # one position per row
    ((3, 4, 5, 3), 'nchw', F32, TINY),
    ((2, 5, 4, 7), 'channels_last', F32, TINY),
]
# ResNet-50 shapes with an H100's 4 programs per multiprocessor
H100 = dict(min_programs=528)
RESNET_CASES = [
    ((8, 64, 112, 112), 'nchw', F32, H100),
    ((8, 2048, 7, 7), 'nchw', torch.bfloat16, H100),
    ((8, 256, 56, 56), 'channels_last', torch.bfloat16, H100),
    ((32, 2048, 7, 7), 'channels_last', F32, H100),
]


def record_launches(cases):
    """The (kernel, args, constexprs, num_warps) of each launch of the
    backend's methods over the given cases."""
    records = []

    def record(kernel, grid, *args, num_warps=4, **constexprs):
        records.append((kernel, args, constexprs, num_warps))

    saved = triton_launch._launch, triton_backend.kernels_interpreted
    triton_launch._launch = record
    triton_backend.kernels_interpreted = lambda: True
    try:
        for shape, layout, dtype, options in cases:
            x = torch.empty(shape, dtype=dtype)
            if layout == 'channels_last':
                x = x.contiguous(memory_format=torch.channels_last
                                 if x.dim() == 4 else torch.channels_last_3d)
            n, c = shape[:2]
            x3 = x.reshape(n, c, -1)
            backend = triton_backend.TritonBackend(**options)
            _exercise(backend, x3)
    finally:
        triton_launch._launch, triton_backend.kernels_interpreted = saved
    return records


def _exercise(backend, x3):
    n, c = x3.shape[:2]
    stats = torch.ones(n, c)
    per_c = torch.ones(c)
    correction = 1 if x3.shape[2] > 1 else 0
    backend.moments(x3, correction)
    dy = torch.empty_like(x3)
    backend.rows_grad_sums(dy, x3, stats)
    backend.rows_grad_input(dy, x3, stats, stats, stats, stats)
    for weight, bias, batch in [(per_c, per_c, (per_c, per_c)),
                                (None, None, None)]:
        k = 3 if batch else 2
        shares = torch.full((k, ), 1.0 / k)
        batch = batch or (None, None)
        backend.sn_normalize(x3, stats, stats, weight, bias, shares, shares,
                             *batch, 1e-5)
        for pooled, need_dx in [(True, True), (False, True), (False, False)]:
            if pooled and batch[0] is None:
                continue
            backend.sn_backward(dy, x3, stats, stats, weight, shares, shares,
                                *batch, pooled, 1e-5, correction, need_dx)
    _exercise_layer(backend, x3, dy)


def _exercise_layer(backend, x3, dy):
    """The layer operators' kernels, as SN/SSN layers call them: logits
    (softmax) or shares, with and without a BN branch and affine
    parameters, each kind of running-statistics update."""
    n, c = x3.shape[:2]
    stats = torch.ones(n, c)
    count = torch.zeros(4, dtype=torch.long)
    for k, affine, softmax in [(3, True, True), (2, False, True),
                               (3, True, False)]:
        weight = torch.ones(c) if affine else None
        logits = torch.zeros(k)
        running = (torch.zeros(c), torch.ones(c)) if k == 3 else (None, None)
        for momentum, moving in [(0.1, True), (None, True), (0.1, False)]:
            backend.layer_train(x3, weight, weight, logits, logits, *running,
                                torch.zeros((), dtype=torch.long), count,
                                softmax, momentum, moving, 1e-5, True, True)
            if k == 2:
                break
        backend.layer_eval(x3, weight, weight, logits, logits, *running,
                           count, softmax, 1e-5, True)
        for batch_stats in ([True, False] if k == 3 else [False]):
            for need_dx in (True, False):
                backend.layer_backward(dy, x3, stats, stats, weight, logits,
                                       logits, *running, softmax,
                                       batch_stats, 1e-5, True, need_dx)


def compile_variants(records, arch):
    target = GPUTarget('cuda', arch, 32)
    backend_cls = type(make_backend(target))
    seen, results = set(), []
    for kernel, args, constexprs, num_warps in records:
        names = kernel.arg_names
        signature, attrs, consts = {}, {}, dict(constexprs)
        for i, (name, value) in enumerate(zip(names, args)):
            kind, spec = native_specialize_impl(backend_cls, value, False,
                                                True, True)
            if kind == 'constexpr':
                consts[name] = spec
                signature[name] = 'constexpr'
                continue
            signature[name] = kind
            if spec:
                attrs[(i, )] = backend_cls.parse_attr(spec)
        for name in constexprs:
            signature[name] = 'constexpr'
        key = (kernel.__name__, tuple(signature.items()),
               tuple(sorted(consts.items())), num_warps,
               repr(sorted(attrs.items())))
        if key in seen:
            continue
        seen.add(key)
        src = triton.compiler.ASTSource(kernel, signature, consts, attrs)
        start = time.perf_counter()
        try:
            compiled = triton.compile(src, target=target,
                                      options={'num_warps': num_warps})
            error = None
        except Exception as exc:  # report every failing variant
            compiled, error = None, f'{type(exc).__name__}: {exc}'
        results.append((kernel.__name__, consts, signature, num_warps,
                        time.perf_counter() - start, compiled, error))
    return results


def resource_usage(cubin: bytes) -> str:
    """REG/STACK/LOCAL of a cubin, from the cuobjdump bundled with triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends',
                        'nvidia', 'bin', 'cuobjdump')
    if not os.path.exists(tool):
        return ''
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, '--dump-resource-usage', f.name],
                             capture_output=True, text=True).stdout
    for line in out.splitlines():
        if 'REG:' in line:
            return ' '.join(w for w in line.split()
                            if w.split(':')[0] in ('REG', 'STACK', 'LOCAL'))
    return ''


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', type=int, default=90,
                        help='compute capability, e.g. 90 for H100/H200')
    parser.add_argument('--resources', action='store_true',
                        help='print registers and spills of each variant')
    parser.add_argument('--quick', action='store_true',
                        help='leave out the ResNet-50 shapes')
    args = parser.parse_args()
    if not isinstance(triton_kernels._moments_kernel,
                      triton.runtime.JITFunction):
        sys.exit('run without TRITON_INTERPRET=1')
    cases = CASES if args.quick else CASES + RESNET_CASES
    results = compile_variants(record_launches(cases), args.arch)
    failed = 0
    for name, consts, signature, num_warps, seconds, compiled, error in \
            results:
        dtypes = sorted({v for k, v in signature.items()
                         if v.startswith('*') and v != '*fp32'})
        label = (f'{name} {consts} warps={num_warps}'
                 + (f' {dtypes}' if dtypes else ''))
        if error:
            failed += 1
            print(f'FAILED {label}\n  {error}')
            continue
        extra = resource_usage(compiled.asm['cubin']) if args.resources \
            else ''
        print(f'ok {seconds:5.2f}s {label} {extra}')
    print(f'triton {triton.__version__}, sm_{args.arch}: '
          f'{len(results) - failed} variants compiled, {failed} failed')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
