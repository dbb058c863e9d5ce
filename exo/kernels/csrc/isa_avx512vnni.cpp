#define EXO_ISA_TABLE kAvx512Vnni
#define EXO_ISA_NAME "avx512vnni"
#include "kernels_body.inc"
