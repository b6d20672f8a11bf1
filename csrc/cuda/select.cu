// Deterministic top-k selection on the GPU (launchers declared in select.cuh).
//
// Contract: the indices of the k largest (smallest) scores, ties won by the lower index,
// returned in ascending index order -- exactly reference.select_topk.
//
// Design.
// 1. Keys. Each score maps to an unsigned key whose unsigned order is the float order: -0.0 is
//    canonicalised to +0.0, then negatives are bit-inverted and positives get the sign bit set.
//    For "smallest" the key is inverted, so the task is always "k largest keys". fp16/bf16 keys
//    are their 16 bits in the top half of a uint32 (2 radix passes), fp32 keys are 32 bits
//    (4 passes), fp64 keys 64 bits (8 passes).
// 2. Radix select of the threshold T = the k-th largest key, most significant byte first. Each
//    pass is a grid-stride histogram (256 bins in shared memory, warp-aggregated atomics via
//    __match_any_sync so heavy ties do not serialise, then one global atomic per bin and block)
//    of the keys that match the prefix found so far, followed by a single-CTA pick kernel that
//    finds the bin holding the k-th key, extends the prefix and counts the keys strictly above
//    it. When the chosen bin holds exactly the keys still needed the search stops early (a
//    state flag makes the remaining passes no-ops). Everything stays on the device: no host
//    round trip, no data-dependent launch configuration.
// 3. Stable compaction. With T (on the resolved top bits), c_gt keys above it and
//    rem = k - c_gt ties to take, index i is selected iff key_i > T, or key_i == T and fewer
//    than rem tied keys precede i. Tiles of 4096 indices first count their "above" and "tied"
//    keys; one CTA scans those counts (tied-before and output-offset per tile); then every tile
//    re-derives its flags and writes its selected indices at offset + rank, where the rank
//    comes from warp ballots and a per-round exchange of the 8 warp counts. Positions therefore
//    grow with the index: ascending output without any sort, bit-identical on every run.
//    Tiles with nothing to write return at once, so small k costs little in that pass.
// All sizes and offsets are int64 / unsigned 64-bit; per-block counters are 32-bit only where a
// block provably counts fewer than 2^32 elements.
#include <climits>
#include <cstdint>

#include "cosine_loss.cuh"
#include "select.cuh"

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;  // threads of the histogram, count and write kernels
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 4096;  // indices per compaction tile
constexpr int kRounds = kTile / kThreads;
constexpr int kScanThreads = 1024;
constexpr int64_t kMaxHistBlocks = 2048;

struct SelectState {
  unsigned long long prefix;     // resolved top `bits` bits of the threshold key T
  unsigned long long remaining;  // ties at T still to take: k - c_gt
  unsigned long long c_gt;       // keys strictly above T (on the resolved bits)
  unsigned int bits;             // number of resolved key bits
  unsigned int done;             // 1: the remaining radix passes are not needed
};

constexpr size_t align_up(size_t v) { return (v + 255) & ~static_cast<size_t>(255); }

struct Layout {
  size_t state, hist, tile_gt, tile_eq, eq_before, out_before, total;
};

Layout layout(int64_t n) {
  const size_t tiles = n > 0 ? static_cast<size_t>((n + kTile - 1) / kTile) : 0;
  Layout l;
  l.state = 0;
  l.hist = align_up(sizeof(SelectState));
  l.tile_gt = l.hist + align_up(256 * sizeof(unsigned long long));
  l.tile_eq = l.tile_gt + align_up(tiles * sizeof(unsigned));
  l.eq_before = l.tile_eq + align_up(tiles * sizeof(unsigned));
  l.out_before = l.eq_before + align_up(tiles * sizeof(unsigned long long));
  l.total = l.out_before + align_up(tiles * sizeof(unsigned long long));
  return l;
}

template <class KeyT>
struct KeyBits {
  static constexpr int value = static_cast<int>(sizeof(KeyT) * 8);
};

// Mask of the top `bits` bits of a key (0 <= bits <= key_bits).
template <class KeyT>
__device__ __forceinline__ KeyT top_mask(int bits) {
  return bits <= 0 ? KeyT(0) : static_cast<KeyT>(~KeyT(0) << (KeyBits<KeyT>::value - bits));
}

// Order-preserving key of the score at element offset off; inverted for "smallest".
template <class KeyT>
__device__ __forceinline__ KeyT score_key(const void* scores, int64_t off, int dtype, bool largest);

template <>
__device__ __forceinline__ uint32_t score_key<uint32_t>(const void* scores, int64_t off, int dtype,
                                                        bool largest) {
  uint32_t key;
  if (dtype == RELA_FLOAT32) {
    uint32_t b = static_cast<const uint32_t*>(scores)[off];
    if ((b & 0x7fffffffu) == 0u) b = 0u;  // -0.0 -> +0.0
    key = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  } else {  // fp16 / bf16: same IEEE layout in 16 bits
    uint32_t h = static_cast<const uint16_t*>(scores)[off];
    if ((h & 0x7fffu) == 0u) h = 0u;
    h = (h & 0x8000u) ? (~h & 0xffffu) : (h | 0x8000u);
    key = h << 16;
  }
  return largest ? key : ~key;
}

template <>
__device__ __forceinline__ uint64_t score_key<uint64_t>(const void* scores, int64_t off, int,
                                                        bool largest) {
  uint64_t b = static_cast<const uint64_t*>(scores)[off];
  if ((b & 0x7fffffffffffffffull) == 0ull) b = 0ull;
  const uint64_t key = (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
  return largest ? key : ~key;
}

__global__ void __launch_bounds__(256)
    select_init_kernel(SelectState* st, unsigned long long* hist, int64_t k) {
  hist[threadIdx.x] = 0ull;
  if (threadIdx.x == 0) {
    st->prefix = 0ull;
    st->remaining = static_cast<unsigned long long>(k);
    st->c_gt = 0ull;
    st->bits = 0u;
    st->done = 0u;
  }
}

// Histogram of digit `pass` (8 bits, most significant first) over the keys whose already
// resolved top bits equal the prefix.
template <class KeyT>
__global__ void __launch_bounds__(kThreads)
    radix_hist_kernel(const void* scores, int dtype, int64_t n, int64_t stride, bool largest,
                      int pass, const SelectState* st, unsigned long long* hist) {
  __shared__ unsigned int bins[256];
  if (st->done) return;  // uniform across the grid
  bins[threadIdx.x] = 0u;
  __syncthreads();
  const int shift = KeyBits<KeyT>::value - 8 * (pass + 1);
  const KeyT mask = top_mask<KeyT>(8 * pass);
  const KeyT prefix = static_cast<KeyT>(st->prefix);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  // The loop bound depends on `base` only, so whole warps iterate together (needed by
  // __match_any_sync); out-of-range lanes carry the "no digit" value 256.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < n; base += step) {
    const int64_t i = base + threadIdx.x;
    unsigned digit = 256u;
    if (i < n) {
      const KeyT key = score_key<KeyT>(scores, i * stride, dtype, largest);
      if ((key & mask) == prefix) digit = static_cast<unsigned>(key >> shift) & 0xffu;
    }
    const unsigned peers = __match_any_sync(kFullMask, digit);
    if (digit < 256u && lane == __ffs(peers) - 1) {
      atomicAdd(&bins[digit], static_cast<unsigned>(__popc(peers)));
    }
  }
  __syncthreads();
  const unsigned c = bins[threadIdx.x];
  if (c != 0u) atomicAdd(&hist[threadIdx.x], static_cast<unsigned long long>(c));
}

// One CTA of 256 threads: thread b owns bin b. Finds the bin that holds the remaining-th
// largest key, extends the prefix, and clears the histogram for the next pass.
template <class KeyT>
__global__ void __launch_bounds__(256)
    radix_pick_kernel(int pass, SelectState* st, unsigned long long* hist) {
  __shared__ unsigned long long counts[256];
  if (st->done) return;  // uniform; the histogram is still all zeros then
  const int b = static_cast<int>(threadIdx.x);
  const unsigned long long h = hist[b];
  const unsigned long long rem = st->remaining;
  counts[b] = h;
  __syncthreads();  // all reads of st and counts happen before the single writer below
  unsigned long long above = 0ull;
  for (int j = b + 1; j < 256; ++j) above += counts[j];
  hist[b] = 0ull;
  // The intervals (above, above + h] of the bins partition (0, total]: exactly one bin wins
  // when 1 <= rem <= total, which holds by construction (rem <= keys matching the prefix).
  if (above < rem && rem <= above + h) {
    const int shift = KeyBits<KeyT>::value - 8 * (pass + 1);
    st->prefix |= static_cast<unsigned long long>(b) << shift;
    st->c_gt += above;
    st->remaining = rem - above;
    st->bits = static_cast<unsigned>(8 * (pass + 1));
    if (rem - above == h) st->done = 1u;  // every key of this bin is taken: T is decided
  }
}

__device__ __forceinline__ unsigned warp_sum(unsigned v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Per tile of kTile indices: keys above T and keys equal to T (on the resolved bits).
template <class KeyT>
__global__ void __launch_bounds__(kThreads)
    tile_count_kernel(const void* scores, int dtype, int64_t n, int64_t stride, bool largest,
                      const SelectState* st, unsigned* tile_gt, unsigned* tile_eq) {
  __shared__ unsigned s_gt[kWarps], s_eq[kWarps];
  const KeyT mask = top_mask<KeyT>(static_cast<int>(st->bits));
  const KeyT thr = static_cast<KeyT>(st->prefix);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile;
  unsigned gt = 0u, eq = 0u;
  for (int r = 0; r < kRounds; ++r) {
    const int64_t i = base + r * kThreads + threadIdx.x;
    if (i < n) {
      const KeyT key = score_key<KeyT>(scores, i * stride, dtype, largest) & mask;
      gt += key > thr ? 1u : 0u;
      eq += key == thr ? 1u : 0u;
    }
  }
  gt = warp_sum(gt);
  eq = warp_sum(eq);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if (lane == 0) {
    s_gt[warp] = gt;
    s_eq[warp] = eq;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned tg = 0u, te = 0u;
    for (int w = 0; w < kWarps; ++w) {
      tg += s_gt[w];
      te += s_eq[w];
    }
    tile_gt[blockIdx.x] = tg;
    tile_eq[blockIdx.x] = te;
  }
}

// Exclusive prefix sum of v over the CTA (thread order); *total gets the CTA sum. All threads
// must call it; ws holds 32 entries.
__device__ __forceinline__ unsigned long long block_exclusive_scan(unsigned long long v,
                                                                   unsigned long long* total,
                                                                   unsigned long long* ws) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  unsigned long long x = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const unsigned long long y = __shfl_up_sync(kFullMask, x, off);
    if (lane >= off) x += y;
  }
  __syncthreads();  // earlier readers of ws are done
  if (lane == 31) ws[warp] = x;
  __syncthreads();
  if (warp == 0) {
    unsigned long long w = lane < warps ? ws[lane] : 0ull;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const unsigned long long y = __shfl_up_sync(kFullMask, w, off);
      if (lane >= off) w += y;
    }
    ws[lane] = w;  // inclusive sums of the warp totals
  }
  __syncthreads();
  *total = ws[warps - 1];
  return (warp > 0 ? ws[warp - 1] : 0ull) + x - v;
}

// One CTA: for every tile, the tied keys before it and the output offset of its first
// selected index. A tile takes all its keys above T and the first
// clamp(rem - tied_before, 0, tied) of its tied keys.
__global__ void __launch_bounds__(kScanThreads)
    tile_scan_kernel(int64_t tiles, const SelectState* st, const unsigned* tile_gt,
                     const unsigned* tile_eq, unsigned long long* eq_before,
                     unsigned long long* out_before) {
  __shared__ unsigned long long ws[32];
  const unsigned long long rem = st->remaining;
  unsigned long long run_eq = 0ull, run_sel = 0ull;
  for (int64_t base = 0; base < tiles; base += kScanThreads) {  // uniform
    const int64_t i = base + threadIdx.x;
    const unsigned long long eq = i < tiles ? tile_eq[i] : 0ull;
    const unsigned long long gt = i < tiles ? tile_gt[i] : 0ull;
    unsigned long long eq_total, sel_total;
    const unsigned long long eq_ex = run_eq + block_exclusive_scan(eq, &eq_total, ws);
    const unsigned long long take = eq_ex >= rem ? 0ull : (rem - eq_ex < eq ? rem - eq_ex : eq);
    const unsigned long long sel = gt + take;
    const unsigned long long sel_ex = run_sel + block_exclusive_scan(sel, &sel_total, ws);
    if (i < tiles) {
      eq_before[i] = eq_ex;
      out_before[i] = sel_ex;
    }
    run_eq += eq_total;
    run_sel += sel_total;
  }
}

// Writes the selected indices of one tile at their final, index-ordered positions.
template <class KeyT>
__global__ void __launch_bounds__(kThreads)
    tile_write_kernel(const void* scores, int dtype, int64_t n, int64_t stride, bool largest,
                      const SelectState* st, const unsigned long long* eq_before,
                      const unsigned long long* out_before, int64_t tiles, int64_t k,
                      int64_t* out) {
  __shared__ unsigned s_gt[kWarps], s_eq[kWarps];
  const int64_t tile = blockIdx.x;
  unsigned long long run_sel = out_before[tile];
  const unsigned long long end_sel =
      tile + 1 < tiles ? out_before[tile + 1] : static_cast<unsigned long long>(k);
  if (run_sel >= end_sel) return;  // uniform: nothing selected in this tile
  unsigned long long run_eq = eq_before[tile];
  const unsigned long long rem = st->remaining;
  const KeyT mask = top_mask<KeyT>(static_cast<int>(st->bits));
  const KeyT thr = static_cast<KeyT>(st->prefix);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t base = tile * kTile;
  for (int r = 0; r < kRounds; ++r) {
    const int64_t i = base + r * kThreads + threadIdx.x;
    bool gt = false, eq = false;
    if (i < n) {
      const KeyT key = score_key<KeyT>(scores, i * stride, dtype, largest) & mask;
      gt = key > thr;
      eq = key == thr;
    }
    const unsigned b_eq = __ballot_sync(kFullMask, eq);
    const unsigned b_gt = __ballot_sync(kFullMask, gt);
    if (lane == 0) {
      s_eq[warp] = static_cast<unsigned>(__popc(b_eq));
      s_gt[warp] = static_cast<unsigned>(__popc(b_gt));
    }
    __syncthreads();
    // Walk the warps in index order: tied rank and output position at the start of each.
    unsigned long long eq_acc = run_eq, sel_acc = run_sel;
    unsigned long long my_eq = run_eq, my_sel = run_sel;
    for (int w = 0; w < kWarps; ++w) {
      const unsigned long long e = s_eq[w];
      const unsigned long long take = eq_acc >= rem ? 0ull : (rem - eq_acc < e ? rem - eq_acc : e);
      if (w == warp) {
        my_eq = eq_acc;
        my_sel = sel_acc;
      }
      eq_acc += e;
      sel_acc += s_gt[w] + take;
    }
    const unsigned long long eq_rank = my_eq + static_cast<unsigned>(__popc(b_eq & lanes_below));
    const bool sel = gt || (eq && eq_rank < rem);
    const unsigned b_sel = __ballot_sync(kFullMask, sel);
    if (sel) {
      const unsigned long long pos = my_sel + static_cast<unsigned>(__popc(b_sel & lanes_below));
      if (pos < static_cast<unsigned long long>(k)) out[pos] = i;
    }
    run_eq = eq_acc;
    run_sel = sel_acc;
    __syncthreads();  // s_eq / s_gt are read before the next round overwrites them
  }
}

__global__ void __launch_bounds__(256) iota_kernel(int64_t* out, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    out[i] = i;
  }
}

template <class KeyT>
cudaError_t run_select(const void* scores, int dtype, int64_t n, int64_t stride, int64_t k,
                       bool largest, int64_t* out, char* ws, cudaStream_t stream) {
  const Layout l = layout(n);
  auto* st = reinterpret_cast<SelectState*>(ws + l.state);
  auto* hist = reinterpret_cast<unsigned long long*>(ws + l.hist);
  auto* tile_gt = reinterpret_cast<unsigned*>(ws + l.tile_gt);
  auto* tile_eq = reinterpret_cast<unsigned*>(ws + l.tile_eq);
  auto* eq_before = reinterpret_cast<unsigned long long*>(ws + l.eq_before);
  auto* out_before = reinterpret_cast<unsigned long long*>(ws + l.out_before);
  const int64_t tiles = (n + kTile - 1) / kTile;
  if (tiles > INT_MAX) return cudaErrorInvalidValue;

  select_init_kernel<<<1, 256, 0, stream>>>(st, hist, k);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int significant_bits =
      dtype == RELA_FLOAT64 ? 64 : (dtype == RELA_FLOAT32 ? 32 : 16);
  const int passes = significant_bits / 8;
  int64_t hist_blocks = (n + kThreads - 1) / kThreads;
  if (hist_blocks > kMaxHistBlocks) hist_blocks = kMaxHistBlocks;
  for (int pass = 0; pass < passes; ++pass) {
    radix_hist_kernel<KeyT><<<static_cast<unsigned>(hist_blocks), kThreads, 0, stream>>>(
        scores, dtype, n, stride, largest, pass, st, hist);
    radix_pick_kernel<KeyT><<<1, 256, 0, stream>>>(pass, st, hist);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  const unsigned grid = static_cast<unsigned>(tiles);
  tile_count_kernel<KeyT><<<grid, kThreads, 0, stream>>>(scores, dtype, n, stride, largest, st,
                                                         tile_gt, tile_eq);
  tile_scan_kernel<<<1, kScanThreads, 0, stream>>>(tiles, st, tile_gt, tile_eq, eq_before,
                                                   out_before);
  tile_write_kernel<KeyT><<<grid, kThreads, 0, stream>>>(scores, dtype, n, stride, largest, st,
                                                         eq_before, out_before, tiles, k, out);
  return cudaGetLastError();
}

}  // namespace

extern "C" size_t rela_select_topk_workspace_bytes(int64_t n) { return layout(n).total; }

extern "C" cudaError_t rela_select_topk(const void* scores, int dtype, int64_t n, int64_t stride,
                                        int64_t k, bool largest, int64_t* out, void* workspace,
                                        size_t workspace_bytes, cudaStream_t stream) {
  if (n < 0 || k < 0 || k > n) return cudaErrorInvalidValue;
  if (dtype != RELA_FLOAT32 && dtype != RELA_FLOAT16 && dtype != RELA_BFLOAT16 &&
      dtype != RELA_FLOAT64) {
    return cudaErrorInvalidValue;
  }
  if (k == 0) return cudaSuccess;
  if (out == nullptr) return cudaErrorInvalidValue;
  if (k == n) {  // everything, in index order
    int64_t blocks = (n + 255) / 256;
    if (blocks > 65535) blocks = 65535;
    iota_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(out, n);
    return cudaGetLastError();
  }
  if (scores == nullptr || workspace == nullptr ||
      workspace_bytes < rela_select_topk_workspace_bytes(n) ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  char* ws = static_cast<char*>(workspace);
  if (dtype == RELA_FLOAT64) {
    return run_select<uint64_t>(scores, dtype, n, stride, k, largest, out, ws, stream);
  }
  return run_select<uint32_t>(scores, dtype, n, stride, k, largest, out, ws, stream);
}

extern "C" size_t rela_score_and_select_workspace_bytes(int64_t rows) {
  return rela_select_topk_workspace_bytes(rows);
}

extern "C" cudaError_t rela_score_and_select(const void* z, int z_dtype, int64_t z_stride0,
                                             int64_t z_stride1, const RelaTransportArgs* t,
                                             float eps, int64_t k, bool largest, float* losses,
                                             int64_t* out, void* workspace,
                                             size_t workspace_bytes, cudaStream_t stream) {
  if (t == nullptr) return cudaErrorInvalidValue;
  if (k < 0 || k > t->rows) return cudaErrorInvalidValue;
  const cudaError_t err = rela_transported_cosine_loss_fwd(z, z_dtype, z_stride0, z_stride1, t,
                                                           eps, losses, nullptr, stream);
  if (err != cudaSuccess) return err;
  return rela_select_topk(losses, RELA_FLOAT32, t->rows, 1, k, largest, out, workspace,
                          workspace_bytes, stream);
}
