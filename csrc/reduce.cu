// The plan of the two-level merge of per-channel partials (the kernel is a template in reduce.cuh).
#include <cmath>

#include "reduce.cuh"

namespace nvae {

MergePlan merge_plan(int64_t parts, int fields, int64_t channels, bool welford) {
  MergePlan m;
  m.parts = parts;
  m.fields = welford ? 3 : fields;
  m.channels = channels;
  m.welford = welford;
  m.ctiles = ceil_div(channels, kMergeLanes);
  if (parts <= kMergeRows) {  // one run: one partial per row
    m.seg_len = std::max<int64_t>(parts, 1);
    m.segments = 1;
  } else {
    const auto root = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(parts))));
    m.seg_len = kMergeRows * ceil_div(root, kMergeRows);
    m.segments = ceil_div(parts, m.seg_len);
  }
  return m;
}

}  // namespace nvae
