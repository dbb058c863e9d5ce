#define EXO_ISA_TABLE kPortable
#define EXO_ISA_NAME "portable"
#include "kernels_body.inc"
