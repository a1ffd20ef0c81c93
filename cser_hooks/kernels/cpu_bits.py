"""CPU (Numba) packing of flags and L-bit codes (docs/algorithms.md §1 wire formats).

Element i of a bit field goes to byte i//8, bit i%8 (LSB first, as numpy.packbits(bitorder=
"little")); an L-bit code (L in {1, 2, 4, 8}) of element i starts at bit i*L. Pad bits are 0.
Packing reads 8 codes at a time as one integer word and gathers their low bits with shifts (and,
for L = 1, one multiplication), which LLVM vectorises.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

#: codes per parallel work item (a multiple of 8)
CHUNK = 1 << 18


@njit(cache=True)
def pack_words(codes, nbits, out):
    """Pack all of ``codes`` (uint8, low ``nbits`` bits used) into out[0 : ceil(len*nbits/8)]."""
    m = codes.size
    nw = m >> 3
    whole = codes[:nw * 8]
    if nbits == 1:
        w64 = whole.view(np.uint64)
        for q in range(nw):
            out[q] = np.uint8(((w64[q] & np.uint64(0x0101010101010101)) * np.uint64(0x0102040810204080))
                              >> np.uint64(56))
    elif nbits == 2:
        w32 = whole.view(np.uint32)
        for q in range(2 * nw):
            w = w32[q]
            out[q] = np.uint8((w & np.uint32(0x3)) | ((w >> np.uint32(6)) & np.uint32(0xC))
                              | ((w >> np.uint32(12)) & np.uint32(0x30)) | ((w >> np.uint32(18)) & np.uint32(0xC0)))
    elif nbits == 4:
        w16 = whole.view(np.uint16)
        for q in range(4 * nw):
            w = w16[q]
            out[q] = np.uint8((w & np.uint16(0xF)) | ((w >> np.uint16(4)) & np.uint16(0xF0)))
    else:
        for q in range(8 * nw):
            out[q] = whole[q]
    if nw * 8 < m:  # the last, partial group of 8 codes
        mask = (1 << nbits) - 1
        byte = 0
        pos = 0
        q = nw * nbits
        for r in range(nw * 8, m):
            byte |= (np.int64(codes[r]) & mask) << pos
            pos += nbits
            if pos == 8:
                out[q] = np.uint8(byte)
                q += 1
                byte = 0
                pos = 0
        if pos != 0:
            out[q] = np.uint8(byte)


@njit(parallel=True, cache=True)
def pack_codes(codes, nbits, n, out):
    """out = the n codes packed nbits each (chunks of CHUNK codes in parallel)."""
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        pack_words(codes[lo:hi], nbits, out[(lo * nbits) >> 3:(hi * nbits + 7) >> 3])


@njit(parallel=True, cache=True)
def unpack_codes(packed, nbits, n, out):
    mask = (1 << nbits) - 1
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        os = out[lo:hi]
        for m in range(os.size):
            i = lo + m
            os[m] = np.uint8((np.int64(packed[(i * nbits) >> 3]) >> ((i * nbits) & 7)) & mask)
