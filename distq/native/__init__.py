"""distq's native CPU kernels: C++ compiled on this machine into one shared library, called
with ctypes.

``bitops_api.h`` is the C interface. ``bitops_kernels.inc`` holds the integer engine's bit
kernels and the training quantizers' one-pass loops (used by ``distq.quant.native_cpu`` on the
CPU); each ``isa_*.cpp`` compiles it for AVX-512 (VPOPCNTDQ), AVX2 or plain C++, chosen at run
time by ``entry.cpp``.
``build.py`` compiles the library once per version of the sources (``python -m distq.native``,
run by ``make install``), ``library.py`` loads it or says once why not. Everything here has a
torch reference that it must equal to the bit; ``DISTQ_NATIVE=0`` runs the references only.
"""
