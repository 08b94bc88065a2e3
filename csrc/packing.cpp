#include "packing.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <thread>

#include <pybind11/numpy.h>

namespace agentflan::packing {
namespace {

// One unit of packing: a whole document, a truncated document or one chunk of
// a split document.
struct Item {
  int64_t len;
  int64_t doc;
  int64_t start;
};

// Max-tree over the room left in packs 0..leaves-1. Packs not opened yet have
// full room, so the leftmost leaf with enough room is either the lowest-index
// open pack that fits or, failing that, the next new pack.
class RoomTree {
 public:
  RoomTree(int64_t max_packs, int64_t capacity) {
    while (leaves_ < max_packs) leaves_ <<= 1;
    room_.assign(2 * static_cast<size_t>(leaves_), capacity);
  }

  // Lowest pack id with room >= need; need <= capacity always finds one
  // because there are as many leaves as items.
  int64_t first_fit(int64_t need) const {
    size_t node = 1;
    while (node < static_cast<size_t>(leaves_)) {
      node <<= 1;
      if (room_[node] < need) ++node;  // left subtree cannot hold it
    }
    return static_cast<int64_t>(node) - leaves_;
  }

  void take(int64_t pack, int64_t amount) {
    size_t node = static_cast<size_t>(pack + leaves_);
    room_[node] -= amount;
    for (node >>= 1; node >= 1; node >>= 1) {
      const int64_t best = std::max(room_[2 * node], room_[2 * node + 1]);
      if (room_[node] == best) break;  // ancestors depend only on this value
      room_[node] = best;
    }
  }

 private:
  int64_t leaves_ = 1;
  std::vector<int64_t> room_;  // 1-based heap layout; leaves at [leaves_, 2 * leaves_)
};

// Turns the lengths into packing items in (document, chunk) order, applying
// the overlong policy and filling the plan's counters.
std::vector<Item> make_items(const int64_t* lengths, int64_t n_docs, int64_t capacity,
                             Overlong policy, Plan& plan) {
  // First pass: validate and count, so the item vector is allocated once.
  int64_t n_items = 0;
  for (int64_t d = 0; d < n_docs; ++d) {
    const int64_t len = lengths[d];
    if (len < 0) {
      throw std::invalid_argument("lengths[" + std::to_string(d) + "] is " + std::to_string(len) +
                                  "; document lengths must be >= 0");
    }
    if (len == 0) {
      ++plan.n_empty;
    } else if (len <= capacity || policy == Overlong::kTruncate) {
      ++n_items;
    } else if (policy == Overlong::kSplit) {
      n_items += len / capacity + (len % capacity != 0);  // ceil without overflow
    } else {
      throw std::invalid_argument("document " + std::to_string(d) + " has " + std::to_string(len) +
                                  " tokens, more than the pack capacity " +
                                  std::to_string(capacity) +
                                  " (overlong='error'; use 'split' or 'truncate')");
    }
  }

  std::vector<Item> items;
  items.reserve(static_cast<size_t>(n_items));
  for (int64_t d = 0; d < n_docs; ++d) {
    const int64_t len = lengths[d];
    if (len == 0) continue;
    if (len <= capacity) {
      items.push_back({len, d, 0});
    } else if (policy == Overlong::kTruncate) {
      items.push_back({capacity, d, 0});
      ++plan.n_truncated;
      plan.tokens_dropped += len - capacity;
    } else {
      for (int64_t start = 0; start < len; start += capacity) {
        items.push_back({std::min(capacity, len - start), d, start});
      }
      ++plan.n_split;
    }
  }
  return items;
}

}  // namespace

Overlong parse_overlong(const std::string& name) {
  if (name == "split") return Overlong::kSplit;
  if (name == "truncate") return Overlong::kTruncate;
  if (name == "error") return Overlong::kError;
  throw std::invalid_argument("overlong must be one of 'split', 'truncate', 'error', got '" + name +
                              "'");
}

Plan plan_packs(const int64_t* lengths, int64_t n_docs, int64_t capacity, Overlong policy) {
  if (capacity <= 0) {
    throw std::invalid_argument("capacity must be positive, got " + std::to_string(capacity));
  }
  Plan plan;
  std::vector<Item> items = make_items(lengths, n_docs, capacity, policy, plan);

  // Items are already in (document, chunk) order, so a stable sort on length
  // alone yields the documented tie-break.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.len > b.len; });

  const int64_t n_items = static_cast<int64_t>(items.size());
  RoomTree tree(n_items, capacity);
  std::vector<int64_t> pack_of(items.size());
  int64_t n_packs = 0;
  for (int64_t i = 0; i < n_items; ++i) {
    const int64_t pack = tree.first_fit(items[i].len);
    tree.take(pack, items[i].len);
    pack_of[i] = pack;
    n_packs = std::max(n_packs, pack + 1);
    plan.real_tokens += items[i].len;
  }

  // Group pieces by pack with a counting sort; visiting items in placement
  // order keeps each pack's pieces in insertion order.
  plan.pack_offsets.assign(static_cast<size_t>(n_packs) + 1, 0);
  for (const int64_t pack : pack_of) ++plan.pack_offsets[pack + 1];
  for (int64_t p = 0; p < n_packs; ++p) plan.pack_offsets[p + 1] += plan.pack_offsets[p];

  std::vector<int64_t> cursor(plan.pack_offsets.begin(), plan.pack_offsets.end() - 1);
  plan.doc_index.resize(items.size());
  plan.doc_start.resize(items.size());
  plan.piece_len.resize(items.size());
  for (int64_t i = 0; i < n_items; ++i) {
    const int64_t k = cursor[pack_of[i]]++;
    plan.doc_index[k] = items[i].doc;
    plan.doc_start[k] = items[i].start;
    plan.piece_len[k] = items[i].len;
  }
  return plan;
}

BatchLayout layout_batch(const PlanView& plan, const CorpusView& corpus,
                         const int64_t* pack_indices, int64_t n_batch) {
  const int64_t* offs = corpus.doc_offsets;
  if (offs[0] != 0) {
    throw std::invalid_argument("doc_offsets[0] must be 0, got " + std::to_string(offs[0]));
  }
  if (offs[corpus.n_docs] != corpus.n_tokens) {
    throw std::invalid_argument("doc_offsets[-1] is " + std::to_string(offs[corpus.n_docs]) +
                                " but tokens has " + std::to_string(corpus.n_tokens) + " entries");
  }
  for (int64_t d = 0; d < corpus.n_docs; ++d) {
    if (offs[d + 1] < offs[d]) {
      throw std::invalid_argument("doc_offsets must be non-decreasing, but doc_offsets[" +
                                  std::to_string(d + 1) + "] = " + std::to_string(offs[d + 1]) +
                                  " < doc_offsets[" + std::to_string(d) +
                                  "] = " + std::to_string(offs[d]));
    }
  }

  BatchLayout layout;
  layout.packs.assign(pack_indices, pack_indices + n_batch);
  layout.token_offset.assign(static_cast<size_t>(n_batch) + 1, 0);
  layout.piece_offset.assign(static_cast<size_t>(n_batch) + 1, 0);
  for (int64_t j = 0; j < n_batch; ++j) {
    const int64_t p = layout.packs[j];
    if (p < 0 || p >= plan.n_packs) {
      throw std::out_of_range("pack_indices[" + std::to_string(j) + "] = " + std::to_string(p) +
                              " is out of range for a plan with " + std::to_string(plan.n_packs) +
                              " packs");
    }
    const int64_t first = plan.pack_offsets[p];
    const int64_t last = plan.pack_offsets[p + 1];
    if (first < 0 || first > last || last > plan.n_pieces) {
      throw std::invalid_argument("plan is corrupt: pack " + std::to_string(p) + " spans pieces [" +
                                  std::to_string(first) + ", " + std::to_string(last) +
                                  ") of " + std::to_string(plan.n_pieces));
    }
    int64_t tokens = 0;
    for (int64_t k = first; k < last; ++k) {
      const int64_t d = plan.doc_index[k];
      const int64_t start = plan.doc_start[k];
      const int64_t len = plan.piece_len[k];
      if (d < 0 || d >= corpus.n_docs) {
        throw std::invalid_argument("plan piece " + std::to_string(k) + " refers to document " +
                                    std::to_string(d) + ", but the corpus has " +
                                    std::to_string(corpus.n_docs) + " documents");
      }
      const int64_t doc_len = offs[d + 1] - offs[d];
      if (len <= 0 || start < 0 || start > doc_len - len) {
        throw std::invalid_argument("plan piece " + std::to_string(k) + " covers tokens [" +
                                    std::to_string(start) + ", " + std::to_string(start + len) +
                                    ") of document " + std::to_string(d) + ", which has " +
                                    std::to_string(doc_len) + " tokens");
      }
      tokens += len;
      layout.max_seqlen = std::max(layout.max_seqlen, len);
    }
    layout.token_offset[j + 1] = layout.token_offset[j] + tokens;
    layout.piece_offset[j + 1] = layout.piece_offset[j] + (last - first);
  }
  // cu_seqlens and position_ids are int32, the dtype varlen attention expects.
  if (layout.total_tokens() > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("batch has " + std::to_string(layout.total_tokens()) +
                                " tokens; int32 cu_seqlens allow at most 2147483647");
  }
  return layout;
}

namespace {

// Fills packs [j_begin, j_end) of the layout. Returns the OR of every gathered
// loss-mask value, so values other than 0/1 are detected without a branch per
// token.
uint8_t fill_packs(const PlanView& plan, const CorpusView& corpus, const BatchLayout& layout,
                   const BatchOut& out, int64_t j_begin, int64_t j_end) {
  uint8_t seen = 0;
  for (int64_t j = j_begin; j < j_end; ++j) {
    const int64_t p = layout.packs[j];
    int64_t o = layout.token_offset[j];
    int64_t slot = layout.piece_offset[j];
    for (int64_t k = plan.pack_offsets[p]; k < plan.pack_offsets[p + 1]; ++k) {
      const int64_t len = plan.piece_len[k];
      const int64_t src = corpus.doc_offsets[plan.doc_index[k]] + plan.doc_start[k];
      const int32_t* tok = corpus.tokens + src;
      const uint8_t* mask = corpus.loss_mask + src;
      out.cu_seqlens[slot++] = static_cast<int32_t>(o);
      std::copy_n(tok, len, out.input_ids + o);
      std::copy_n(mask, len, out.loss_mask + o);
      for (int64_t i = 0; i < len; ++i) {
        out.position_ids[o + i] = static_cast<int32_t>(i);
        seen |= mask[i];
      }
      // Token i is trained to predict token i + 1 of the same piece when that
      // token is a target; the piece's last token has nothing to predict.
      for (int64_t i = 0; i + 1 < len; ++i) {
        out.labels[o + i] = mask[i + 1] ? static_cast<int64_t>(tok[i + 1]) : int64_t{-100};
      }
      out.labels[o + len - 1] = -100;
      o += len;
    }
  }
  return seen;
}

// Error path only: names the first corpus token with a mask value above 1.
[[noreturn]] void report_bad_mask(const PlanView& plan, const CorpusView& corpus,
                                  const BatchLayout& layout) {
  for (const int64_t p : layout.packs) {
    for (int64_t k = plan.pack_offsets[p]; k < plan.pack_offsets[p + 1]; ++k) {
      const int64_t src = corpus.doc_offsets[plan.doc_index[k]] + plan.doc_start[k];
      for (int64_t i = 0; i < plan.piece_len[k]; ++i) {
        if (corpus.loss_mask[src + i] > 1) {
          throw std::invalid_argument(
              "loss_mask must hold only 0 or 1, but loss_mask[" + std::to_string(src + i) +
              "] (document " + std::to_string(plan.doc_index[k]) + ") is " +
              std::to_string(corpus.loss_mask[src + i]));
        }
      }
    }
  }
  throw std::logic_error("report_bad_mask found no bad loss_mask value");
}

int resolve_threads(int requested, const BatchLayout& layout) {
  int64_t n = requested > 0 ? requested
                            : static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  n = std::min<int64_t>(n, static_cast<int64_t>(layout.packs.size()));
  n = std::min<int64_t>(n, layout.total_tokens() / kParallelGrainTokens);
  return static_cast<int>(std::max<int64_t>(n, 1));
}

}  // namespace

void fill_batch(const PlanView& plan, const CorpusView& corpus, const BatchLayout& layout,
                const BatchOut& out, int num_threads) {
  const int n_threads = resolve_threads(num_threads, layout);
  const int64_t n_batch = static_cast<int64_t>(layout.packs.size());

  // Split the packs into n_threads runs of about equal token count; the prefix
  // sum of pack sizes gives each pack's output offset, so runs never overlap.
  std::vector<int64_t> bounds(static_cast<size_t>(n_threads) + 1, n_batch);
  bounds[0] = 0;
  for (int t = 1; t < n_threads; ++t) {
    const int64_t target = layout.total_tokens() * t / n_threads;
    bounds[t] = std::lower_bound(layout.token_offset.begin(), layout.token_offset.end(), target) -
                layout.token_offset.begin();
    bounds[t] = std::min(bounds[t], n_batch);
  }

  std::vector<uint8_t> seen(static_cast<size_t>(n_threads), 0);
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(n_threads) - 1);
  try {
    for (int t = 1; t < n_threads; ++t) {
      workers.emplace_back([&, t] {
        seen[t] = fill_packs(plan, corpus, layout, out, bounds[t], bounds[t + 1]);
      });
    }
  } catch (...) {
    for (std::thread& w : workers) w.join();  // a joinable std::thread must not be destroyed
    throw;
  }
  seen[0] = fill_packs(plan, corpus, layout, out, bounds[0], bounds[1]);
  for (std::thread& w : workers) w.join();

  out.cu_seqlens[layout.total_pieces()] = static_cast<int32_t>(layout.total_tokens());
  uint8_t all_seen = 0;
  for (const uint8_t s : seen) all_seen |= s;
  if (all_seen > 1) report_bad_mask(plan, corpus, layout);
}

// ---------------------------------------------------------------------------
// Python bindings. agentflan/data/packing.py converts dtypes and gives the
// friendly API; these functions only check what the core cannot.

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& values) {
  py::array_t<T> array(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), array.mutable_data());
  return array;
}

void require_1d(const py::array& array, const char* name) {
  if (array.ndim() != 1) {
    throw std::invalid_argument(std::string(name) + " must be 1-D, got " +
                                std::to_string(array.ndim()) + " dimensions");
  }
}

py::tuple py_plan_packs(const CArray<int64_t>& lengths, int64_t capacity,
                        const std::string& overlong) {
  require_1d(lengths, "lengths");
  const Overlong policy = parse_overlong(overlong);
  const int64_t* data = lengths.data();
  const int64_t n_docs = lengths.size();
  Plan plan;
  {
    py::gil_scoped_release nogil;
    plan = plan_packs(data, n_docs, capacity, policy);
  }
  py::dict stats;
  stats["n_empty"] = plan.n_empty;
  stats["n_split"] = plan.n_split;
  stats["n_truncated"] = plan.n_truncated;
  stats["tokens_dropped"] = plan.tokens_dropped;
  stats["real_tokens"] = plan.real_tokens;
  return py::make_tuple(to_numpy(plan.doc_index), to_numpy(plan.doc_start),
                        to_numpy(plan.piece_len), to_numpy(plan.pack_offsets), stats);
}

py::tuple py_build_batch(const CArray<int64_t>& doc_index, const CArray<int64_t>& doc_start,
                         const CArray<int64_t>& piece_len, const CArray<int64_t>& pack_offsets,
                         const CArray<int64_t>& pack_indices, const CArray<int32_t>& tokens,
                         const CArray<int64_t>& doc_offsets, const CArray<uint8_t>& loss_mask,
                         int num_threads) {
  require_1d(doc_index, "doc_index");
  require_1d(doc_start, "doc_start");
  require_1d(piece_len, "piece_len");
  require_1d(pack_offsets, "pack_offsets");
  require_1d(pack_indices, "pack_indices");
  require_1d(tokens, "tokens");
  require_1d(doc_offsets, "doc_offsets");
  require_1d(loss_mask, "loss_mask");
  if (doc_start.size() != doc_index.size() || piece_len.size() != doc_index.size()) {
    throw std::invalid_argument("doc_index, doc_start and piece_len must have the same length");
  }
  if (pack_offsets.size() < 1) throw std::invalid_argument("pack_offsets must not be empty");
  if (doc_offsets.size() < 1) {
    throw std::invalid_argument("doc_offsets must have n_docs + 1 >= 1 entries");
  }
  if (loss_mask.size() != tokens.size()) {
    throw std::invalid_argument("loss_mask has " + std::to_string(loss_mask.size()) +
                                " entries but tokens has " + std::to_string(tokens.size()));
  }
  if (num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0, got " + std::to_string(num_threads));
  }

  const PlanView plan{doc_index.data(), doc_start.data(),    piece_len.data(),
                      doc_index.size(), pack_offsets.data(), pack_offsets.size() - 1};
  const CorpusView corpus{tokens.data(), loss_mask.data(), tokens.size(), doc_offsets.data(),
                          doc_offsets.size() - 1};
  BatchLayout layout;
  {
    py::gil_scoped_release nogil;
    layout = layout_batch(plan, corpus, pack_indices.data(), pack_indices.size());
  }

  const auto n_tok = static_cast<py::ssize_t>(layout.total_tokens());
  py::array_t<int32_t> input_ids(n_tok);
  py::array_t<int64_t> labels(n_tok);
  py::array_t<uint8_t> mask_out(n_tok);
  py::array_t<int32_t> cu_seqlens(static_cast<py::ssize_t>(layout.total_pieces()) + 1);
  py::array_t<int32_t> position_ids(n_tok);
  const BatchOut out{input_ids.mutable_data(), labels.mutable_data(), mask_out.mutable_data(),
                     cu_seqlens.mutable_data(), position_ids.mutable_data()};
  {
    py::gil_scoped_release nogil;
    fill_batch(plan, corpus, layout, out, num_threads);
  }
  return py::make_tuple(input_ids, labels, mask_out, cu_seqlens, position_ids, layout.max_seqlen);
}

}  // namespace

void register_packing(py::module_& m) {
  m.def("plan_packs", &py_plan_packs, py::arg("lengths"), py::arg("capacity"),
        py::arg("overlong"),
        "First-fit-decreasing plan: (doc_index, doc_start, piece_len, pack_offsets, stats).");
  // tokens and loss_mask are the whole corpus: .noconvert() makes a wrong
  // dtype or layout a TypeError instead of a silent full copy per batch.
  m.def("build_batch", &py_build_batch, py::arg("doc_index"), py::arg("doc_start"),
        py::arg("piece_len"), py::arg("pack_offsets"), py::arg("pack_indices"),
        py::arg("tokens").noconvert(), py::arg("doc_offsets"), py::arg("loss_mask").noconvert(),
        py::arg("num_threads"),
        "Gathers packs into one varlen batch: (input_ids, labels, loss_mask, cu_seqlens, "
        "position_ids, max_seqlen).");
  m.attr("PARALLEL_GRAIN_TOKENS") = kParallelGrainTokens;
}

}  // namespace agentflan::packing
