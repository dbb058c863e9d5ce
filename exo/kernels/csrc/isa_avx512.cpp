#define EXO_ISA_TABLE kAvx512
#define EXO_ISA_NAME "avx512"
#include "kernels_body.inc"
