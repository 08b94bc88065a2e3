// agentflan._C: the native half of the data pipeline. It speaks numpy arrays
// only (no torch headers), so the wheel is independent of the torch ABI.
#include <pybind11/pybind11.h>

#include "packing.h"
#include "tokenizer.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "agentflan native extension: sequence packing";
  agentflan::packing::register_packing(m);
  agentflan::tokenizer::register_tokenizer(m);
}
