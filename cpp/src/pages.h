// A loaded session's weights file: once ONNX Runtime has pre-packed the weights, only the pages its kernels
// still read (the tied embedding's lookup rows) should stay resident. gemma_export/runtime/pages.py explains
// why and what was measured; this is the same for the C++ runtime (and Java, which calls it).
#pragma once

#include <string>

namespace gemma {

// fdatasync + posix_fadvise(DONTNEED) on `path` (its page-cache pages that no mapping holds are dropped), then
// madvise(MADV_RANDOM) on this process's mappings of it (a fault maps its own page, not the folio or the
// read-around window). Best effort: a missing file or a failing call changes nothing; a no-op off Linux.
void settle_weights(const std::string& path);

}  // namespace gemma
