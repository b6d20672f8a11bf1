"""The pure CUDA sources compile with nvcc alone, for sm_80 and sm_90, on any machine.

csrc/cuda/*.cu (except bindings.cu, the torch glue built only with CUDA torch) include no torch
header, so CI checks them wherever nvcc exists, GPU or not. Two host-side checks follow:

- a small program linked against the objects checks what needs no device: the workspace query
  and the launchers' argument validation (every call returns before touching the GPU);
- the kernels themselves run under a host emulation of the CUDA execution model (one std::thread
  per CUDA thread, real barriers for __syncthreads and the warp intrinsics, poisoned shared
  memory) and are compared with rela_kernels/reference.py. That checks indexing, masking,
  barrier placement (a divergent barrier deadlocks and times out) and the selection algorithm
  on machines without a GPU; it says nothing about speed. A kernel that starts using a CUDA
  feature the emulator lacks must extend EMU_FILES below.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(p for p in CUDA_DIR.glob("*.cu") if p.name != "bindings.cu")
ARCH_FLAGS = [
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=sm_90",
]
# setup.py builds with torch's CUDAExtension, which disables the implicit half/bfloat16
# conversions; compile the same way so code relying on them fails here too.
TORCH_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")

HOST_CHECK = r"""
#include <cstdio>
#include "cosine_loss.cuh"
#include "select.cuh"

static int failures = 0;
#define EXPECT(cond)                                              \
  do {                                                            \
    if (!(cond)) {                                                \
      std::printf("FAILED line %d: %s\n", __LINE__, #cond);       \
      ++failures;                                                 \
    }                                                             \
  } while (0)

int main() {
  const cudaError_t bad = cudaErrorInvalidValue;
  // Workspace: grows with n, covers the per-tile counters, is 256-byte granular.
  const size_t w0 = rela_select_topk_workspace_bytes(0);
  const size_t w1 = rela_select_topk_workspace_bytes(1);
  const size_t wbig = rela_select_topk_workspace_bytes(100000000);
  EXPECT(w0 > 0 && w0 % 256 == 0);
  EXPECT(w1 >= w0 && wbig > w1);
  EXPECT(wbig >= (100000000 / 4096) * 24);
  EXPECT(rela_score_and_select_workspace_bytes(12345) == rela_select_topk_workspace_bytes(12345));
  // select_topk argument checks (no launch happens on any of these paths).
  int64_t out[4];
  EXPECT(rela_select_topk(nullptr, RELA_FLOAT32, 10, 1, 11, true, out, nullptr, 0, 0) == bad);
  EXPECT(rela_select_topk(nullptr, RELA_FLOAT32, 10, 1, -1, true, out, nullptr, 0, 0) == bad);
  EXPECT(rela_select_topk(nullptr, 42, 10, 1, 1, true, out, nullptr, 0, 0) == bad);
  EXPECT(rela_select_topk(nullptr, RELA_FLOAT32, 10, 1, 0, true, nullptr, nullptr, 0, 0) ==
         cudaSuccess);
  EXPECT(rela_select_topk(nullptr, RELA_FLOAT16, 0, 1, 0, false, nullptr, nullptr, 0, 0) ==
         cudaSuccess);
  float scores[10] = {0};
  alignas(16) unsigned char ws[64];
  EXPECT(rela_select_topk(scores, RELA_FLOAT32, 10, 1, 3, true, out, ws, sizeof(ws),
                          0) == bad);  // workspace too small
  // Loss launchers: empty batches succeed without launching, bad arguments are refused.
  float loss[1];
  EXPECT(rela_cosine_loss_fwd(nullptr, RELA_FLOAT32, 1, 1, nullptr, RELA_FLOAT32, 1, 1, 0, 8,
                              1e-8f, nullptr, nullptr, 0) == cudaSuccess);
  EXPECT(rela_cosine_loss_fwd(nullptr, RELA_FLOAT32, 1, 1, nullptr, RELA_FLOAT32, 1, 1, -1, 8,
                              1e-8f, loss, nullptr, 0) == bad);
  EXPECT(rela_cosine_loss_fwd(nullptr, RELA_FLOAT64, 1, 1, nullptr, RELA_FLOAT32, 1, 1, 2, 8,
                              1e-8f, loss, nullptr, 0) == bad);
  RelaTransportArgs t = {};
  t.p_dtype = RELA_FLOAT32;
  EXPECT(rela_transport(nullptr, nullptr, 0) == bad);
  EXPECT(rela_transport(&t, nullptr, 0) == cudaSuccess);  // rows == 0
  t.rows = 4;
  t.dp = 3;
  t.d = 2;  // p, mean, matrix missing
  EXPECT(rela_transport(&t, nullptr, 0) == bad);
  EXPECT(rela_transported_cosine_loss_fwd(nullptr, RELA_FLOAT32, 1, 1, &t, 1e-8f, loss, nullptr,
                                          0) == bad);
  EXPECT(rela_score_and_select(nullptr, RELA_FLOAT32, 1, 1, &t, 1e-8f, 5, true, loss,
                               out, nullptr, 0, 0) == bad);  // k > rows
  if (failures == 0) std::printf("host checks passed\n");
  return failures == 0 ? 0 : 1;
}
"""


# ------------------------------------------------------------------------------------------
# Host emulation of the CUDA execution model (test-only). The kernels are compiled by g++ with
# these stand-ins for the CUDA headers; `kernel<<<grid, block, smem, stream>>>(args)` launches
# are rewritten to emu::launch(grid, block, lambda) by emulate_launches().

EMU_FILES = {
    "fake/cuda_runtime.h": r"""
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int*);
cudaError_t cudaDeviceGetAttribute(int*, cudaDeviceAttr, int);
""",
    "fake/cuda_fp16.h": r"""
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
struct __half { uint16_t x; };
inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1fu,
                 man = h.x & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    float f = std::ldexp((float)man, -24);
    return sign ? -f : f;
  }
  u = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  __half h;
  if (ax > 0x7f800000u) {
    h.x = (uint16_t)(sign | 0x7e00u);
  } else if (ax >= 0x477ff000u) {
    h.x = (uint16_t)(sign | 0x7c00u);
  } else if (ax < 0x38800000u) {
    float af;
    std::memcpy(&af, &ax, 4);
    h.x = (uint16_t)(sign | (uint32_t)std::nearbyint(af * 16777216.0f));
  } else {
    h.x = (uint16_t)(sign | ((ax - 0x38000000u + 0xfffu + ((ax >> 13) & 1u)) >> 13));
  }
  return h;
}
""",
    "fake/cuda_bf16.h": r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = (uint32_t)h.x << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.x = 0x7fc0;
  } else {
    r.x = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return r;
}
""",
    "emu.h": r"""
#pragma once
#include <cuda_runtime.h>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared memory: statics in one section, poisoned (0xff bytes, NaN floats) before each block.
#define __shared__ static __attribute__((section("emu_shared")))
namespace emu {
struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32];
};
struct Block {
  std::barrier<>* bar;
  std::vector<Warp>* warps;
};
extern thread_local dim3 tIdx, bIdx, bDim, gDim;
extern thread_local Block* blk;
void launch(dim3 grid, dim3 block, const std::function<void()>& f);
inline Warp& warp() { return (*blk->warps)[tIdx.x / 32]; }
inline int lane() { return (int)(tIdx.x % 32); }
template <class T> uint64_t bits(T v) { uint64_t u = 0; std::memcpy(&u, &v, sizeof(T)); return u; }
template <class T> T unbits(uint64_t u) { T v; std::memcpy(&v, &u, sizeof(T)); return v; }
// Every lane publishes a value, then reads what it needs: all 32 lanes must take part.
template <class R, class F> R exchange(uint64_t mine, F&& read) {
  Warp& w = warp();
  w.slot[lane()] = mine;
  w.bar.arrive_and_wait();
  R r = read(w.slot);
  w.bar.arrive_and_wait();
  return r;
}
}  // namespace emu
#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define blockDim emu::bDim
#define gridDim emu::gDim
inline void __syncthreads() { emu::blk->bar->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m, int = 32) {
  return emu::exchange<T>(emu::bits(v),
                          [&](uint64_t* s) { return emu::unbits<T>(s[emu::lane() ^ m]); });
}
template <class T> T __shfl_up_sync(unsigned, T v, unsigned d, int = 32) {
  return emu::exchange<T>(emu::bits(v), [&](uint64_t* s) {
    return emu::lane() >= (int)d ? emu::unbits<T>(s[emu::lane() - (int)d]) : v; });
}
inline unsigned __ballot_sync(unsigned, int p) {
  return emu::exchange<unsigned>(p != 0, [](uint64_t* s) {
    unsigned r = 0; for (int i = 0; i < 32; ++i) r |= (unsigned)(s[i] & 1u) << i; return r; });
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
  return emu::exchange<unsigned>(v, [&](uint64_t* s) {
    unsigned r = 0; for (int i = 0; i < 32; ++i) r |= (unsigned)(s[i] == v) << i; return r; });
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
""",
    "emu.cpp": r"""
#include "emu.h"
#include <cstdio>
#include <cstdlib>
#include <thread>
extern char __start_emu_shared[], __stop_emu_shared[];
namespace emu {
thread_local dim3 tIdx, bIdx, bDim, gDim;
thread_local Block* blk;
static void poison() {
  std::memset(__start_emu_shared, 0xff, __stop_emu_shared - __start_emu_shared);
}
// One host thread per CUDA thread; the blocks of the grid run one after the other.
void launch(dim3 grid, dim3 block, const std::function<void()>& f) {
  const unsigned nt = block.x;
  if (nt == 0 || nt > 1024 || nt % 32 != 0 || block.y != 1 || block.z != 1 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    std::fprintf(stderr, "invalid launch configuration\n");
    std::abort();
  }
  poison();
  std::barrier<> bar(nt);
  std::vector<Warp> warps(nt / 32);
  Block b{&bar, &warps};
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            tIdx = dim3(t, 0, 0); bIdx = dim3(x, y, z); bDim = block; gDim = grid; blk = &b;
            f();
            bar.arrive_and_wait();
            if (t == 0) poison();
            bar.arrive_and_wait();
          }
    });
  }
  for (auto& th : threads) th.join();
}
}  // namespace emu
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  const char* e = std::getenv("EMU_SMS");
  *v = e ? std::atoi(e) : 4;
  return cudaSuccess;
}
""",
}


def emulate_launches(src: str) -> str:
    """Rewrites every `name<<<grid, block, ...>>>(args)` as emu::launch(grid, block, lambda)."""

    def split_top(text: str) -> list[str]:
        parts, depth, cur = [], 0, ""
        for ch in text:
            depth += ch in "([<"
            depth -= ch in ")]>"
            if ch == "," and depth == 0:
                parts.append(cur.strip())
                cur = ""
            else:
                cur += ch
        return [*parts, cur.strip()]

    out, i = [], 0
    while (j := src.find("<<<", i)) >= 0:
        k, depth = j, 0  # walk back over the kernel name and its template arguments
        while k > 0:
            c = src[k - 1]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
            elif depth == 0 and not (c.isalnum() or c in "_:"):
                break
            k -= 1
        e = src.index(">>>", j)
        cfg = split_top(src[j + 3 : e])
        p = q = src.index("(", e)
        depth = 0
        while True:
            depth += src[q] == "("
            depth -= src[q] == ")"
            if depth == 0:
                break
            q += 1
        out.append(src[i:k])
        out.append(
            f"emu::launch(dim3({cfg[0]}), dim3({cfg[1]}), [&] {{ {src[k:j]}({src[p + 1 : q]}); }})"
        )
        i = q + 1
    out.append(src[i:])
    return "".join(out)


EMU_CHECKS = r"""
import ctypes, importlib.util, os, sys
import torch

spec = importlib.util.spec_from_file_location("reference", sys.argv[2])
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
lib = ctypes.CDLL(sys.argv[1])
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
I64, P, INT, F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
BOOL = ctypes.c_bool


class TArgs(ctypes.Structure):
    _fields_ = [("p", P), ("p_dtype", INT), ("p_stride0", I64), ("p_stride1", I64),
                ("mean", P), ("matrix", P), ("bias", P), ("rows", I64), ("dp", I64), ("d", I64)]


TP = ctypes.POINTER(TArgs)
for name, args in {
    "rela_transport": [TP, P, P],
    "rela_cosine_loss_fwd": [P, INT, I64, I64, P, INT, I64, I64, I64, I64, F32, P, P, P],
    "rela_transported_cosine_loss_fwd": [P, INT, I64, I64, TP, F32, P, P, P],
    "rela_select_topk": [P, INT, I64, I64, I64, BOOL, P, P, ctypes.c_size_t, P],
    "rela_score_and_select": [P, INT, I64, I64, TP, F32, I64, BOOL, P, P, P, ctypes.c_size_t, P],
}.items():
    getattr(lib, name).argtypes = args
    getattr(lib, name).restype = INT
lib.rela_select_topk_workspace_bytes.argtypes = [I64]
lib.rela_select_topk_workspace_bytes.restype = ctypes.c_size_t


def targs(p, mean, matrix, bias):
    return TArgs(p.data_ptr(), DT[p.dtype], p.stride(0), p.stride(1), mean.data_ptr(),
                 matrix.data_ptr(), None if bias is None else bias.data_ptr(), p.shape[0],
                 p.shape[1], matrix.shape[1])


def close(a, b, tol, what):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), (what, a)
    err = ((a - b).abs() / (b.abs() + 1)).max().item() if a.numel() else 0.0
    assert err <= tol, (what, err)


def ref_loss_grad(z, y):
    zf = z.detach().double().requires_grad_(True)
    loss = ref.cosine_loss(zf, y.double(), 1e-8)
    loss.sum().backward()
    return loss.detach(), zf.grad


def mk(rows, cols, dtype, strided):
    x = torch.randn(rows, cols * 2 if strided else cols).to(dtype)
    return x[:, 1::2] if strided else x


def workspace(n):
    return torch.empty(lib.rela_select_topk_workspace_bytes(n), dtype=torch.uint8).fill_(0xAB)


print("seed", torch.seed())  # fresh inputs every run; the seed is in any failure message
for rows, dp, d, dtype, strided, with_bias in [(70, 37, 130, torch.float32, False, True),
                                               (33, 5, 300, torch.bfloat16, True, False)]:
    p = mk(rows, dp, dtype, strided)
    mean, m = torch.randn(dp), torch.randn(dp, d)
    b = torch.randn(d) if with_bias else None
    y = torch.full((rows, d), float("nan"))
    assert lib.rela_transport(ctypes.byref(targs(p, mean, m, b)), y.data_ptr(), None) == 0
    close(y, ref.transport(p, mean, m, b), 1e-5, "transport")

z, y = mk(13, 70, torch.float16, True), mk(13, 70, torch.float32, False)
loss, grad = torch.full((13,), float("nan")), torch.full((13, 70), float("nan")).half()
assert lib.rela_cosine_loss_fwd(z.data_ptr(), 1, z.stride(0), z.stride(1), y.data_ptr(), 0,
                                y.stride(0), y.stride(1), 13, 70, 1e-8, loss.data_ptr(),
                                grad.data_ptr(), None) == 0
rl, rg = ref_loss_grad(z, y)
close(loss, rl, 2e-3, "cosine loss")
close(grad, rg, 4e-3, "cosine grad")

# SM counts steer the tile shape: 1 -> 64-row tiles, 100 -> 32-row tiles; d=200 -> 256-wide
# tile; d=300 -> three tiles, recomputed for the gradient.
for sms, rows, dp, d, zt, pt in [("1", 130, 20, 100, torch.float32, torch.float32),
                                 ("100", 40, 17, 300, torch.bfloat16, torch.float16),
                                 ("100", 21, 9, 200, torch.float32, torch.bfloat16)]:
    os.environ["EMU_SMS"] = sms
    p, z = mk(rows, dp, pt, True), mk(rows, d, zt, True)
    mean, m, b = torch.randn(dp), torch.randn(dp, d) / dp**0.5, torch.randn(d)
    if zt == torch.float32:
        z[1].zero_()  # clamped norm: the |z| term of the gradient vanishes
    rl, rg = ref_loss_grad(z, ref.transport(p, mean, m, b))
    loss = torch.full((rows,), float("nan"))
    grad = torch.full((rows, d), float("nan")).to(zt)
    t = targs(p, mean, m, b)
    assert lib.rela_transported_cosine_loss_fwd(z.data_ptr(), DT[zt], z.stride(0), z.stride(1),
                                                ctypes.byref(t), 1e-8, loss.data_ptr(),
                                                grad.data_ptr(), None) == 0
    tol = 2e-5 if zt == torch.float32 else 1e-2
    close(loss, rl, tol, f"fused loss {sms} {d}")
    close(grad, rg, 2 * tol, f"fused grad {sms} {d}")
    k = rows // 3
    ws, idx = workspace(rows), torch.full((k,), -1, dtype=torch.int64)
    assert lib.rela_score_and_select(z.data_ptr(), DT[zt], z.stride(0), z.stride(1),
                                     ctypes.byref(t), 1e-8, k, True, loss.data_ptr(),
                                     idx.data_ptr(), ws.data_ptr(), ws.numel(), None) == 0
    close(loss, rl, tol, "score_and_select losses")
    assert torch.equal(idx, ref.select_topk(loss, k, True)), "score_and_select indices"

n = 5000
x = torch.randn(n)
x[::7], x[3::11], x[5::13], x[6::13] = float("inf"), float("-inf"), 0.0, -0.0
for scores, k, largest in [(torch.randn(n), 1, True), (torch.randn(n), n // 2, False),
                           (torch.randint(0, 4, (n,)).half(), n // 3, True),
                           (torch.full((n,), 2.5).bfloat16(), 100, False),
                           (x.double(), n // 2, True), (x, 5, False), (x[::3], 1000, True),
                           (x, n, True), (x, 0, True)]:
    ws, out = workspace(scores.shape[0]), torch.full((k,), -1, dtype=torch.int64)
    assert lib.rela_select_topk(scores.data_ptr(), DT[scores.dtype], scores.shape[0],
                                scores.stride(0), k, largest, out.data_ptr(), ws.data_ptr(),
                                ws.numel(), None) == 0
    assert torch.equal(out, ref.select_topk(scores, k, largest)), (scores.dtype, k, largest)
print("emulation checks passed")
"""


@pytest.fixture(scope="module")
def emu_build(tmp_path_factory):
    """Starts the g++ build of the emulated kernels (waited for by the emulation test)."""
    if GXX is None:
        yield None
        return
    root = tmp_path_factory.mktemp("emu")
    for name, text in EMU_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    gen = []
    for src in SOURCES:
        path = root / f"gen_{src.stem}.cpp"
        path.write_text(emulate_launches(src.read_text()))
        gen.append(str(path))
    lib = root / "libemu.so"
    cmd = [
        GXX,
        "-std=c++20",
        "-O1",
        "-fPIC",
        "-shared",
        "-pthread",
        f"-I{root / 'fake'}",
        f"-I{CUDA_DIR}",
        "-include",
        str(root / "emu.h"),
        *gen,
        str(root / "emu.cpp"),
        "-o",
        str(lib),
    ]
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    yield proc, lib
    if proc.poll() is None:  # the emulation test was deselected
        proc.kill()
    proc.communicate()


def _nvcc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NVCC, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, emu_build) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Compiles every source once, in parallel (and alongside the emulation build)."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    procs = {}
    for src in SOURCES:
        obj = out_dir / (src.stem + ".o")
        # -Xptxas -v: ptxas's resource report of every kernel, for each target.
        cmd = [NVCC, "-std=c++17", *ARCH_FLAGS, *TORCH_DEFINES, "-Xptxas", "-v"]
        cmd += ["-c", str(src), "-o", str(obj)]
        procs[src.name] = (
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            cmd,
            obj,
        )
    results = {}
    for name, (proc, cmd, obj) in procs.items():
        output, _ = proc.communicate(timeout=600)
        results[name] = (subprocess.CompletedProcess(cmd, proc.returncode, output, ""), obj)
    return results


def test_sources_exist():
    names = {p.name for p in SOURCES}
    assert {"cosine_loss.cu", "select.cu"} <= names, names
    assert (CUDA_DIR / "bindings.cu").exists()


@needs_nvcc
@pytest.mark.parametrize("name", [p.name for p in SOURCES])
def test_compiles_for_sm80_and_sm90(compiled, name):
    result, obj = compiled[name]
    assert result.returncode == 0, (
        f"nvcc failed on {name}:\n{' '.join(result.args)}\n{result.stdout}"
    )
    assert obj.exists() and obj.stat().st_size > 0


@needs_nvcc
@pytest.mark.parametrize("name", [p.name for p in SOURCES])
def test_no_kernel_spills_on_sm80_or_sm90(compiled, name):
    """ptxas's report of the same compile: every kernel, on both targets, without a spill
    (`make gpu-compile` records the registers with nvcc -cubin per target)."""
    result, _ = compiled[name]
    assert result.returncode == 0, f"nvcc failed on {name}:\n{result.stdout}"
    kernels = _compile_gate().parse_ptxas_report(result.stdout)
    assert {k["arch"] for k in kernels} == {"sm_80", "sm_90"}, result.stdout[-3000:]
    assert all(0 < k["registers"] <= 255 for k in kernels), kernels
    spilling = [(k["kernel"], k["arch"], k["spill_bytes"]) for k in kernels if k["spill_bytes"]]
    assert not spilling, f"kernels of {name} spill: {spilling}"


def _compile_gate():
    """benchmarks/compile_gate.py, whose ptxas report parser the gate uses too."""
    import importlib.util

    path = ROOT / "benchmarks" / "compile_gate.py"
    spec = importlib.util.spec_from_file_location("compile_gate_for_nvcc", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_no_torch_headers_outside_bindings():
    pattern = re.compile(r"#\s*include\s*[<\"](torch|ATen|c10)/")
    for path in sorted(CUDA_DIR.glob("*.cu*")):
        if path.name == "bindings.cu":
            continue
        hits = [line for line in path.read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{path.name} includes torch headers: {hits}"


@needs_nvcc
def test_launcher_argument_checks_on_host(compiled, tmp_path):
    for name, (result, _) in compiled.items():
        if result.returncode != 0:
            pytest.fail(f"{name} did not compile:\n{result.stdout}")
    src = tmp_path / "host_check.cu"
    src.write_text(HOST_CHECK)
    exe = tmp_path / "host_check"
    objs = [str(obj) for _, obj in compiled.values()]
    build = _nvcc(["-std=c++17", f"-I{CUDA_DIR}", str(src), *objs, "-o", str(exe)], tmp_path)
    assert build.returncode == 0, f"host check build failed:\n{build.stdout}\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, f"host checks failed:\n{run.stdout}\n{run.stderr}"
    assert "host checks passed" in run.stdout


def test_kernels_match_reference_under_host_emulation(emu_build, tmp_path):
    if emu_build is None:
        pytest.skip("g++ not found on PATH")
    pytest.importorskip("torch")
    proc, lib = emu_build
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"emulation build failed:\n{output}"
    script = tmp_path / "emu_checks.py"
    script.write_text(EMU_CHECKS)
    reference = ROOT / "rela_kernels" / "reference.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        run = subprocess.run(
            [sys.executable, str(script), str(lib), str(reference)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("emulated kernels did not finish: a barrier or warp intrinsic deadlocked?")
    assert run.returncode == 0, (
        f"emulated kernels disagree with the reference:\n{run.stdout}\n{run.stderr}"
    )
    assert "emulation checks passed" in run.stdout
