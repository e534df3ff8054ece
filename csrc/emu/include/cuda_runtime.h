// Stand-in for the CUDA header of this name in the emulation build.
#pragma once
#include "../cuda_emu.h"
