// cooperative_groups on the host: defined in cuda_host.h, which every host build includes first.
#include "cuda_host.h"
