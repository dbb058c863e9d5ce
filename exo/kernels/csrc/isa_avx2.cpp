#define EXO_ISA_TABLE kAvx2
#define EXO_ISA_NAME "avx2"
#include "kernels_body.inc"
