// CUDA kernels of densepred's custom ops (built to PTX by core/build.rs with the `cuda` feature).
//
// Each kernel computes what the op's CPU kernel in core/src/ops computes (same sampling rules,
// same comparison semantics); the Rust side (core/src/ops/cuda.rs and the ops' `cuda_fwd`) checks
// shapes, contiguity and dtypes before launching, so the kernels assume well-formed input.
#include <stdint.h>

// ------------------------------------------------------------------------------------------------
// Depthwise 2-D convolution, NCHW, weight (C, 1, KH, KW). Geometry in one struct passed by value.

struct DwGeom {
    int b, c, h, w, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw;
};

// y[b, c, oy, ox] = sum_{ky, kx} w[c, ky, kx] * x[b, c, oy*sh - ph + ky*dh, ox*sw - pw + kx*dw]
// One thread per output element (grid-stride loop).
template <typename T>
__device__ void dw_forward(const T* __restrict__ x, const T* __restrict__ wt, T* __restrict__ y,
                           DwGeom g) {
    const long long n = (long long)g.b * g.c * g.oh * g.ow;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const int ox = (int)(i % g.ow);
        const int oy = (int)((i / g.ow) % g.oh);
        const long long plane = i / ((long long)g.ow * g.oh);  // b * C + c
        const int c = (int)(plane % g.c);
        const T* xp = x + plane * g.h * g.w;
        const T* wp = wt + (long long)c * g.kh * g.kw;
        T acc = 0;
        for (int ky = 0; ky < g.kh; ++ky) {
            const int iy = oy * g.sh - g.ph + ky * g.dh;
            if (iy < 0 || iy >= g.h) continue;
            for (int kx = 0; kx < g.kw; ++kx) {
                const int ix = ox * g.sw - g.pw + kx * g.dw;
                if (ix < 0 || ix >= g.w) continue;
                acc += wp[ky * g.kw + kx] * xp[(long long)iy * g.w + ix];
            }
        }
        y[i] = acc;
    }
}

// gx[b, c, iy, ix] = sum over taps whose output position lands on the grid of
// w[c, ky, kx] * gy[b, c, oy, ox]. One thread per input element: no atomics.
template <typename T>
__device__ void dw_grad_input(const T* __restrict__ gy, const T* __restrict__ wt,
                              T* __restrict__ gx, DwGeom g) {
    const long long n = (long long)g.b * g.c * g.h * g.w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const int ix = (int)(i % g.w);
        const int iy = (int)((i / g.w) % g.h);
        const long long plane = i / ((long long)g.w * g.h);
        const int c = (int)(plane % g.c);
        const T* gp = gy + plane * g.oh * g.ow;
        const T* wp = wt + (long long)c * g.kh * g.kw;
        T acc = 0;
        for (int ky = 0; ky < g.kh; ++ky) {
            const int ty = iy + g.ph - ky * g.dh;  // = oy * sh
            if (ty < 0 || ty % g.sh != 0) continue;
            const int oy = ty / g.sh;
            if (oy >= g.oh) continue;
            for (int kx = 0; kx < g.kw; ++kx) {
                const int tx = ix + g.pw - kx * g.dw;
                if (tx < 0 || tx % g.sw != 0) continue;
                const int ox = tx / g.sw;
                if (ox >= g.ow) continue;
                acc += wp[ky * g.kw + kx] * gp[(long long)oy * g.ow + ox];
            }
        }
        gx[i] = acc;
    }
}

// gw[c, ky, kx] = sum_{b, oy, ox} gy[b, c, oy, ox] * x[b, c, iy, ix]: one block per tap
// (blockIdx.x = (c * KH + ky) * KW + kx), a shared-memory tree reduction over the block.
// blockDim.x must be DW_REDUCE_THREADS.
#define DW_REDUCE_THREADS 256
template <typename T>
__device__ void dw_grad_weight(const T* __restrict__ x, const T* __restrict__ gy,
                               T* __restrict__ gw, DwGeom g) {
    __shared__ T part[DW_REDUCE_THREADS];
    const int tap = blockIdx.x;
    const int kx = tap % g.kw;
    const int ky = (tap / g.kw) % g.kh;
    const int c = tap / (g.kw * g.kh);
    const long long per_plane = (long long)g.oh * g.ow;
    const long long n = (long long)g.b * per_plane;
    T acc = 0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const int b = (int)(i / per_plane);
        const int r = (int)(i % per_plane);
        const int oy = r / g.ow, ox = r % g.ow;
        const int iy = oy * g.sh - g.ph + ky * g.dh;
        const int ix = ox * g.sw - g.pw + kx * g.dw;
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) continue;
        const long long plane = (long long)b * g.c + c;
        acc += gy[plane * per_plane + r] * x[(plane * g.h + iy) * g.w + ix];
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) gw[tap] = part[0];
}

extern "C" __global__ void dwconv_fwd_f32(const float* x, const float* w, float* y, DwGeom g) {
    dw_forward<float>(x, w, y, g);
}
extern "C" __global__ void dwconv_fwd_f64(const double* x, const double* w, double* y, DwGeom g) {
    dw_forward<double>(x, w, y, g);
}
extern "C" __global__ void dwconv_grad_input_f32(const float* gy, const float* w, float* gx,
                                                 DwGeom g) {
    dw_grad_input<float>(gy, w, gx, g);
}
extern "C" __global__ void dwconv_grad_input_f64(const double* gy, const double* w, double* gx,
                                                 DwGeom g) {
    dw_grad_input<double>(gy, w, gx, g);
}
extern "C" __global__ void dwconv_grad_weight_f32(const float* x, const float* gy, float* gw,
                                                  DwGeom g) {
    dw_grad_weight<float>(x, gy, gw, g);
}
extern "C" __global__ void dwconv_grad_weight_f64(const double* x, const double* gy, double* gw,
                                                  DwGeom g) {
    dw_grad_weight<double>(x, gy, gw, g);
}

// ------------------------------------------------------------------------------------------------
// RoIAlign (torchvision.ops.roi_align semantics; see core/src/ops/roi_align.rs for the rules).

struct RoiGeom {
    int k, c, h, w, oh, ow, sampling_ratio, aligned;
    float spatial_scale;
};

// The four taps of one bilinear sample at (y, x) in an H x W plane; false when the sample lies
// outside [-1, H] x [-1, W] (it then contributes 0).
__device__ bool bilinear_taps(float y, float x, int h, int w, int idx[4], float wt[4]) {
    if (y < -1.0f || y > (float)h || x < -1.0f || x > (float)w) return false;
    y = fmaxf(y, 0.0f);
    x = fmaxf(x, 0.0f);
    int y_lo = (int)y, x_lo = (int)x, y_hi, x_hi;
    if (y_lo >= h - 1) {
        y_lo = y_hi = h - 1;
        y = (float)(h - 1);
    } else {
        y_hi = y_lo + 1;
    }
    if (x_lo >= w - 1) {
        x_lo = x_hi = w - 1;
        x = (float)(w - 1);
    } else {
        x_hi = x_lo + 1;
    }
    const float ly = y - (float)y_lo, lx = x - (float)x_lo;
    const float hy = 1.0f - ly, hx = 1.0f - lx;
    idx[0] = y_lo * w + x_lo; wt[0] = hy * hx;
    idx[1] = y_lo * w + x_hi; wt[1] = hy * lx;
    idx[2] = y_hi * w + x_lo; wt[2] = ly * hx;
    idx[3] = y_hi * w + x_hi; wt[3] = ly * lx;
    return true;
}

// Per RoI: start (sy, sx), bin size (bh, bw), samples per axis (gh, gw), as the CPU `plan`.
struct RoiPlan {
    float sy, sx, bh, bw;
    int gh, gw;
};

__device__ RoiPlan roi_plan(const float* roi, const RoiGeom& g) {
    const float off = g.aligned ? 0.5f : 0.0f;
    const float sx = roi[1] * g.spatial_scale - off;
    const float sy = roi[2] * g.spatial_scale - off;
    const float ex = roi[3] * g.spatial_scale - off;
    const float ey = roi[4] * g.spatial_scale - off;
    float rw = ex - sx, rh = ey - sy;
    if (!g.aligned) {
        rw = fmaxf(rw, 1.0f);
        rh = fmaxf(rh, 1.0f);
    }
    RoiPlan p;
    p.sy = sy;
    p.sx = sx;
    p.bh = rh / (float)g.oh;
    p.bw = rw / (float)g.ow;
    p.gh = g.sampling_ratio > 0 ? g.sampling_ratio : (int)fmaxf(ceilf(rh / (float)g.oh), 0.0f);
    p.gw = g.sampling_ratio > 0 ? g.sampling_ratio : (int)fmaxf(ceilf(rw / (float)g.ow), 0.0f);
    return p;
}

// out[k, c, ph, pw]: one thread per output element. `feat` (B, C, H, W), `rois` (K, 5) with
// batch indices already validated on the host.
extern "C" __global__ void roi_align_fwd_f32(const float* __restrict__ feat,
                                             const float* __restrict__ rois,
                                             float* __restrict__ out, RoiGeom g) {
    const long long n = (long long)g.k * g.c * g.oh * g.ow;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const int pw = (int)(i % g.ow);
        const int ph = (int)((i / g.ow) % g.oh);
        const int c = (int)((i / ((long long)g.ow * g.oh)) % g.c);
        const int k = (int)(i / ((long long)g.ow * g.oh * g.c));
        const float* roi = rois + 5 * k;
        const int b = (int)roi[0];
        const RoiPlan p = roi_plan(roi, g);
        const float* f = feat + ((long long)b * g.c + c) * g.h * g.w;
        float acc = 0.0f;
        for (int iy = 0; iy < p.gh; ++iy) {
            const float y = p.sy + (float)ph * p.bh + ((float)iy + 0.5f) * p.bh / (float)p.gh;
            for (int ix = 0; ix < p.gw; ++ix) {
                const float x = p.sx + (float)pw * p.bw + ((float)ix + 0.5f) * p.bw / (float)p.gw;
                int idx[4];
                float wt[4];
                if (bilinear_taps(y, x, g.h, g.w, idx, wt)) {
                    acc += wt[0] * f[idx[0]] + wt[1] * f[idx[1]] + wt[2] * f[idx[2]] +
                           wt[3] * f[idx[3]];
                }
            }
        }
        const int count = max(p.gh * p.gw, 1);
        out[i] = acc * (1.0f / (float)count);
    }
}

// grad_feat (B, C, H, W), zero-initialised by the caller, += each sample's share of
// grad_out[k, c, ph, pw] (atomicAdd: RoIs overlap).
extern "C" __global__ void roi_align_bwd_f32(const float* __restrict__ gy,
                                             const float* __restrict__ rois,
                                             float* __restrict__ gfeat, RoiGeom g) {
    const long long n = (long long)g.k * g.c * g.oh * g.ow;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const int pw = (int)(i % g.ow);
        const int ph = (int)((i / g.ow) % g.oh);
        const int c = (int)((i / ((long long)g.ow * g.oh)) % g.c);
        const int k = (int)(i / ((long long)g.ow * g.oh * g.c));
        const float* roi = rois + 5 * k;
        const int b = (int)roi[0];
        const RoiPlan p = roi_plan(roi, g);
        const int count = max(p.gh * p.gw, 1);
        const float v = gy[i] * (1.0f / (float)count);
        float* gf = gfeat + ((long long)b * g.c + c) * g.h * g.w;
        for (int iy = 0; iy < p.gh; ++iy) {
            const float y = p.sy + (float)ph * p.bh + ((float)iy + 0.5f) * p.bh / (float)p.gh;
            for (int ix = 0; ix < p.gw; ++ix) {
                const float x = p.sx + (float)pw * p.bw + ((float)ix + 0.5f) * p.bw / (float)p.gw;
                int idx[4];
                float wt[4];
                if (bilinear_taps(y, x, g.h, g.w, idx, wt)) {
                    for (int t = 0; t < 4; ++t) atomicAdd(gf + idx[t], wt[t] * v);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// NMS suppression mask (the parallel part of torchvision's CUDA NMS). Boxes (N, 4) xyxy already
// sorted by descending score (ties by index) on the host; `classes` (N,) int64, read only when
// `has_classes` is non-zero. Bit j of
// word mask[i * col_words + j / 64] is set when box j > i overlaps box i with IoU strictly above
// the threshold (and, with classes, has the same class). Grid (col_words, col_words), 64 threads.

#define NMS_BLOCK 64

__device__ float iou_xyxy(const float* a, const float* b) {
    const float area_a = (a[2] - a[0]) * (a[3] - a[1]);
    const float area_b = (b[2] - b[0]) * (b[3] - b[1]);
    const float xx1 = fmaxf(a[0], b[0]), yy1 = fmaxf(a[1], b[1]);
    const float xx2 = fminf(a[2], b[2]), yy2 = fminf(a[3], b[3]);
    const float inter = fmaxf(xx2 - xx1, 0.0f) * fmaxf(yy2 - yy1, 0.0f);
    return inter / (area_a + area_b - inter);
}

extern "C" __global__ void nms_mask_f32(const float* __restrict__ boxes,
                                        const long long* __restrict__ classes, int has_classes,
                                        int n, float thr,
                                        unsigned long long* __restrict__ mask) {
    const int row_block = blockIdx.y, col_block = blockIdx.x;
    if (row_block > col_block) return;
    const int col_words = (n + NMS_BLOCK - 1) / NMS_BLOCK;
    const int row_size = min(n - row_block * NMS_BLOCK, NMS_BLOCK);
    const int col_size = min(n - col_block * NMS_BLOCK, NMS_BLOCK);
    __shared__ float cols[NMS_BLOCK * 4];
    __shared__ long long col_cls[NMS_BLOCK];
    if (threadIdx.x < col_size) {
        const int j = col_block * NMS_BLOCK + threadIdx.x;
        for (int t = 0; t < 4; ++t) cols[threadIdx.x * 4 + t] = boxes[j * 4 + t];
        col_cls[threadIdx.x] = has_classes ? classes[j] : 0;
    }
    __syncthreads();
    if (threadIdx.x < row_size) {
        const int i = row_block * NMS_BLOCK + threadIdx.x;
        const float* bi = boxes + i * 4;
        const long long ci = has_classes ? classes[i] : 0;
        unsigned long long bits = 0;
        const int start = (row_block == col_block) ? threadIdx.x + 1 : 0;
        for (int t = start; t < col_size; ++t) {
            if (col_cls[t] == ci && iou_xyxy(bi, cols + t * 4) > thr) bits |= 1ULL << t;
        }
        mask[(long long)i * col_words + col_block] = bits;
    }
}
