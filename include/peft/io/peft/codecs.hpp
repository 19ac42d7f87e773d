// peft/io/peft/codecs.hpp — every method's checkpoint codec (one include per method of
// adapters/registry.hpp; the loader checks at compile time that none is missing).
#pragma once

#include "peft/io/peft/adalora.hpp"
#include "peft/io/peft/boft.hpp"
#include "peft/io/peft/compacter.hpp"
#include "peft/io/peft/dora.hpp"
#include "peft/io/peft/dynamic_rank.hpp"
#include "peft/io/peft/hra.hpp"
#include "peft/io/peft/ia3.hpp"
#include "peft/io/peft/loha.hpp"
#include "peft/io/peft/lokr.hpp"
#include "peft/io/peft/lora.hpp"
#include "peft/io/peft/phm_delta.hpp"
#include "peft/io/peft/randlora.hpp"
#include "peft/io/peft/shira.hpp"
#include "peft/io/peft/sora.hpp"
#include "peft/io/peft/vera.hpp"
