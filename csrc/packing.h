// Sequence packing: places variable-length documents into fixed-capacity packs
// (first-fit decreasing) and gathers selected packs into one varlen batch.
//
// The core functions below work on raw pointers and std::vector so they carry
// no Python state; register_packing() exposes them to Python over numpy arrays.
// Invalid input raises std::invalid_argument / std::out_of_range, which
// pybind11 turns into ValueError / IndexError.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>

namespace agentflan::packing {

// What to do with a document longer than the pack capacity.
enum class Overlong { kSplit, kTruncate, kError };

// Parses "split" | "truncate" | "error".
Overlong parse_overlong(const std::string& name);

// A packing plan in flat form. Piece k is tokens [doc_start[k], doc_start[k] +
// piece_len[k]) of document doc_index[k]; pack p holds pieces
// [pack_offsets[p], pack_offsets[p + 1]) in insertion order.
struct Plan {
  std::vector<int64_t> doc_index;     // (n_pieces,)
  std::vector<int64_t> doc_start;     // (n_pieces,)
  std::vector<int64_t> piece_len;     // (n_pieces,)
  std::vector<int64_t> pack_offsets;  // (n_packs + 1,)
  int64_t n_empty = 0;                // zero-length documents, skipped
  int64_t n_split = 0;                // documents split into capacity-sized chunks
  int64_t n_truncated = 0;            // documents cut to capacity
  int64_t tokens_dropped = 0;         // tokens removed by truncation
  int64_t real_tokens = 0;            // tokens placed into packs
};

// First-fit decreasing over `n_docs` document lengths. Items are ordered by
// length descending, ties by (document, chunk) ascending, and each goes to the
// lowest-index pack with room. O(n log n) in the number of pieces.
Plan plan_packs(const int64_t* lengths, int64_t n_docs, int64_t capacity, Overlong policy);

// Read-only views of a plan and of the token corpus it refers to.
struct PlanView {
  const int64_t* doc_index;
  const int64_t* doc_start;
  const int64_t* piece_len;
  int64_t n_pieces;
  const int64_t* pack_offsets;  // (n_packs + 1,)
  int64_t n_packs;
};

struct CorpusView {
  const int32_t* tokens;       // (n_tokens,)
  const uint8_t* loss_mask;    // (n_tokens,) 1 = token is a training target
  int64_t n_tokens;
  const int64_t* doc_offsets;  // (n_docs + 1,)
  int64_t n_docs;
};

// Where each selected pack lands in the output batch; built by layout_batch(),
// which also validates the plan against the corpus.
struct BatchLayout {
  std::vector<int64_t> packs;         // (n_batch,) selected pack ids, in order
  std::vector<int64_t> token_offset;  // (n_batch + 1,) prefix sum of pack token counts
  std::vector<int64_t> piece_offset;  // (n_batch + 1,) prefix sum of pack piece counts
  int64_t max_seqlen = 0;
  int64_t total_tokens() const { return token_offset.back(); }
  int64_t total_pieces() const { return piece_offset.back(); }
};

// Checks the corpus (offsets monotonic and matching the token count) and the
// selected packs (ids in range, pieces inside their documents).
BatchLayout layout_batch(const PlanView& plan, const CorpusView& corpus,
                         const int64_t* pack_indices, int64_t n_batch);

// Output buffers of a batch, sized by a BatchLayout.
struct BatchOut {
  int32_t* input_ids;     // (total_tokens,)
  int64_t* labels;        // (total_tokens,)
  uint8_t* loss_mask;     // (total_tokens,)
  int32_t* cu_seqlens;    // (total_pieces + 1,)
  int32_t* position_ids;  // (total_tokens,)
};

// Fills `out` for `layout`, splitting the packs over up to `num_threads`
// threads (0 = hardware concurrency). Throws if a gathered loss-mask value is
// neither 0 nor 1.
void fill_batch(const PlanView& plan, const CorpusView& corpus, const BatchLayout& layout,
                const BatchOut& out, int num_threads);

// A thread is only worth starting for at least this many output tokens.
inline constexpr int64_t kParallelGrainTokens = 1 << 15;

// Adds plan_packs / build_batch to the extension module.
void register_packing(pybind11::module_& m);

}  // namespace agentflan::packing
