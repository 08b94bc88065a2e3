#include "tokenizer.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include <pybind11/numpy.h>

namespace agentflan::tokenizer {
namespace {

using spm::PieceType;

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";      // U+2581, escaped ' '
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// SentencePiece rejects longer pieces when it loads a model.
constexpr size_t kMaxPieceBytes = 8000;

// ---------------------------------------------------------------------------
// UTF-8 exactly as SentencePiece reads it.

// SentencePiece splits text into characters by the lead byte alone: ASCII,
// stray continuation bytes and other invalid leads are 1 byte, 0xC0..0xDF 2,
// 0xE0..0xEF 3, 0xF0..0xFF 4 (clamped to the bytes left by the caller).
inline size_t one_char_len(unsigned char lead) {
  return lead < 0xC0 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}

inline bool is_trail(unsigned char b) { return (b & 0xC0) == 0x80; }

// Length of the well-formed character at s (shortest form, no surrogates,
// at most U+10FFFF), or 0 when s does not start one; the normalizer and the
// byte-piece decoder then turn one byte into U+FFFD.
inline size_t valid_char_len(const unsigned char* s, size_t avail) {
  const uint32_t c = s[0];
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) {
    if (avail < 2 || !is_trail(s[1])) return 0;
    const uint32_t cp = ((c & 0x1F) << 6) | (s[1] & 0x3F);
    return cp >= 0x80 ? 2 : 0;
  }
  if ((c & 0xF0) == 0xE0) {
    if (avail < 3 || !is_trail(s[1]) || !is_trail(s[2])) return 0;
    const uint32_t cp = ((c & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    return cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF) ? 3 : 0;
  }
  if ((c & 0xF8) == 0xF0) {
    if (avail < 4 || !is_trail(s[1]) || !is_trail(s[2]) || !is_trail(s[3])) return 0;
    const uint32_t cp =
        ((c & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    return cp >= 0x10000 && cp <= 0x10FFFF ? 4 : 0;
  }
  return 0;
}

inline const unsigned char* bytes_of(const char* s) {
  return reinterpret_cast<const unsigned char*>(s);
}

// Exact key of one character (1..4 bytes): its bytes little-endian plus its
// length, so that a clamped character never collides with a longer one.
inline uint64_t char_key(const char* s, size_t len) {
  uint64_t key = 0;
  std::memcpy(&key, s, len);
  return key | (static_cast<uint64_t>(len) << 32);
}

inline bool is_space_symbol(const char* s, size_t avail) {
  return avail >= 3 && s[0] == '\xE2' && s[1] == '\x96' && s[2] == '\x81';
}

// ---------------------------------------------------------------------------
// Hashing.

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 32;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 32;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 32;
  return x;
}

inline uint64_t hash_bytes(const char* s, size_t n) {
  uint64_t h = 0x243F6A8885A308D3ull ^ n;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, s, 8);
    h = (h ^ w) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    s += 8;
    n -= 8;
  }
  if (n > 0) {
    uint64_t w = 0;
    std::memcpy(&w, s, n);
    h = (h ^ w) * 0x9E3779B97F4A7C15ull;
  }
  return mix64(h);
}

// Open-addressing map from uint64 keys (never ~0) to small values; built once
// at load time and then only read, from any number of threads.
template <typename V>
class FlatMap {
 public:
  FlatMap() { rehash(16); }

  void insert_or_assign(uint64_t key, const V& value) {
    if ((size_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    Slot& slot = find_slot(key);
    if (slot.key == kEmpty) {
      slot.key = key;
      ++size_;
    }
    slot.value = value;
  }

  const V* find(uint64_t key) const {
    for (size_t i = index(key);; i = (i + 1) & mask_) {
      const Slot& slot = slots_[i];
      if (slot.key == key) return &slot.value;
      if (slot.key == kEmpty) return nullptr;
    }
  }

  bool empty() const { return size_ == 0; }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  struct Slot {
    uint64_t key = kEmpty;
    V value{};
  };

  size_t index(uint64_t key) const {
    return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
  }

  Slot& find_slot(uint64_t key) {
    for (size_t i = index(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key || slots_[i].key == kEmpty) return slots_[i];
    }
  }

  void rehash(size_t capacity) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    shift_ = 64;
    for (size_t c = capacity; c > 1; c >>= 1) --shift_;
    size_ = 0;
    for (const Slot& slot : old) {
      if (slot.key != kEmpty) insert_or_assign(slot.key, slot.value);
    }
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 64;
  size_t size_ = 0;
};

// ---------------------------------------------------------------------------
// The precompiled charsmap: a Darts-clone double-array trie over the input
// bytes whose leaves hold offsets into a pool of NUL-terminated replacement
// strings. Blob layout: uint32 LE trie size in bytes | trie units | pool.

class CharsMap {
 public:
  CharsMap(std::string_view blob, const std::string& origin) {
    if (blob.size() <= 4) {
      throw std::invalid_argument(origin + ": normalizer precompiled_charsmap is truncated (" +
                                  std::to_string(blob.size()) + " bytes)");
    }
    uint32_t trie_bytes = 0;
    for (int i = 0; i < 4; ++i)
      trie_bytes |= static_cast<uint32_t>(static_cast<uint8_t>(blob[i])) << (8 * i);
    if (trie_bytes % 4 != 0 || trie_bytes == 0 || trie_bytes > blob.size() - 4) {
      throw std::invalid_argument(origin + ": normalizer precompiled_charsmap declares a " +
                                  std::to_string(trie_bytes) + "-byte trie in a " +
                                  std::to_string(blob.size()) + "-byte blob");
    }
    units_.resize(trie_bytes / 4);
    for (size_t u = 0; u < units_.size(); ++u) {
      uint32_t v = 0;
      for (int i = 0; i < 4; ++i)
        v |= static_cast<uint32_t>(static_cast<uint8_t>(blob[4 + 4 * u + i])) << (8 * i);
      units_[u] = v;
    }
    pool_.assign(blob.substr(4 + trie_bytes));
    origin_ = origin;
  }

  // Longest rule that matches a prefix of [s, s + n): returns the number of
  // input bytes it covers (0 when none) and sets `replacement`. This walks the
  // trie the way Darts' commonPrefixSearch does, keeping only the last
  // (longest) hit.
  size_t longest_match(const char* s, size_t n, std::string_view& replacement) const {
    const size_t n_units = units_.size();
    size_t node = offset(units_[0]);
    size_t best_len = 0;
    uint32_t best_value = 0;
    for (size_t i = 0; i < n; ++i) {
      const uint32_t label = static_cast<uint8_t>(s[i]);
      node ^= label;
      if (node >= n_units) break;  // past the array: no such transition
      const uint32_t unit = units_[node];
      if ((unit & ((1u << 31) | 0xFFu)) != label) break;
      node ^= offset(unit);
      if ((unit >> 8) & 1u) {  // has a leaf: the key so far is a rule
        if (node >= n_units) corrupt();
        best_len = i + 1;
        best_value = units_[node] & 0x7FFFFFFFu;
      }
    }
    if (best_len > 0) {
      if (best_value >= pool_.size()) corrupt();
      const char* start = pool_.data() + best_value;
      const void* nul = std::memchr(start, '\0', pool_.size() - best_value);
      const size_t len = nul ? static_cast<const char*>(nul) - start : pool_.size() - best_value;
      replacement = std::string_view(start, len);
    }
    return best_len;
  }

 private:
  static size_t offset(uint32_t unit) { return (unit >> 10) << ((unit & (1u << 9)) >> 6); }

  [[noreturn]] void corrupt() const {
    throw std::runtime_error(
        origin_ + ": normalizer precompiled_charsmap is corrupt (a rule points outside it)");
  }

  std::vector<uint32_t> units_;
  std::string pool_;
  std::string origin_;
};

// Longest-match lookup of the user-defined pieces, which SentencePiece keeps
// whole: the normalizer copies them through untouched and BPE starts them as
// frozen symbols that never merge.
class SymbolMatcher {
 public:
  void add(std::string_view symbol, int32_t id) {
    int32_t node = 0;
    for (const char ch : symbol) {
      const uint64_t edge = (static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(ch);
      const int32_t* child = edges_.find(edge);
      if (child) {
        node = *child;
      } else {
        const int32_t created = static_cast<int32_t>(piece_at_.size());
        piece_at_.push_back(-1);
        edges_.insert_or_assign(edge, created);
        node = created;
      }
    }
    piece_at_[node] = id;
    may_start_[static_cast<uint8_t>(symbol[0])] = true;
    all_valid_utf8_ = all_valid_utf8_ && is_valid_utf8(symbol);
  }

  bool empty() const { return piece_at_.size() == 1; }
  bool may_start(unsigned char c) const { return may_start_[c]; }
  bool all_valid_utf8() const { return all_valid_utf8_; }

  // Length of the longest symbol that is a prefix of [s, s + n) (0 if none);
  // `id` receives its piece id.
  size_t longest_match(const char* s, size_t n, int32_t& id) const {
    int32_t node = 0;
    size_t best = 0;
    for (size_t i = 0; i < n; ++i) {
      const int32_t* child =
          edges_.find((static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(s[i]));
      if (!child) break;
      node = *child;
      if (piece_at_[node] >= 0) {
        best = i + 1;
        id = piece_at_[node];
      }
    }
    return best;
  }

 private:
  static bool is_valid_utf8(std::string_view s) {
    for (size_t i = 0; i < s.size();) {
      const size_t len = valid_char_len(bytes_of(s.data() + i), s.size() - i);
      if (len == 0) return false;
      i += len;
    }
    return true;
  }

  FlatMap<int32_t> edges_;             // (node << 8 | byte) -> child node
  std::vector<int32_t> piece_at_{-1};  // node -> piece id ending there, or -1; node 0 is the root
  bool may_start_[256] = {};
  bool all_valid_utf8_ = true;
};

inline bool same_bytes(const char* a, const char* b, size_t n) {
  for (; n >= 8; a += 8, b += 8, n -= 8) {
    uint64_t x, y;
    std::memcpy(&x, a, 8);
    std::memcpy(&y, b, 8);
    if (x != y) return false;
  }
  for (; n > 0; ++a, ++b, --n) {
    if (*a != *b) return false;
  }
  return true;
}

// Per-worker map from segment bytes to ids. Segments follow a Zipf law, so the
// first kMaxEntries distinct ones (mostly the frequent ones) stay for good and
// later ones are computed each time. Lookups are bound by cache misses, so a
// slot is 16 bytes and an entry keeps its ids and key bytes side by side.
class SegmentCache {
 public:
  static constexpr size_t kMaxKeyBytes = 64;
  static constexpr size_t kMaxEntries = size_t{1} << 17;

  SegmentCache() { resize(size_t{1} << 12); }

  // `hash` must be odd (0 marks an empty slot).
  void prefetch(uint64_t hash) const { __builtin_prefetch(&slots_[hash >> shift_]); }

  const int32_t* find(const char* key, size_t len, uint64_t hash, size_t& count) const {
    for (size_t i = hash >> shift_;; i = (i + 1) & mask_) {
      const Slot& slot = slots_[i];
      if (slot.hash == hash && slot.key_len == len) {
        const int32_t* entry = arena_.data() + slot.offset;
        if (same_bytes(reinterpret_cast<const char*>(entry + slot.n_ids), key, len)) {
          count = slot.n_ids;
          return entry;
        }
      } else if (slot.hash == 0) {
        return nullptr;
      }
    }
  }

  void insert(const char* key, size_t len, uint64_t hash, const int32_t* ids, size_t count) {
    if (size_ >= kMaxEntries || count > 0xFFFF) return;
    if ((size_ + 1) * 2 > slots_.size()) resize(slots_.size() * 2);
    const size_t offset = arena_.size();
    place(Slot{hash, static_cast<uint32_t>(offset), static_cast<uint16_t>(len),
               static_cast<uint16_t>(count)});
    arena_.resize(offset + count + (len + 3) / 4);  // ids, then the key padded to whole int32s
    std::copy(ids, ids + count, arena_.begin() + static_cast<std::ptrdiff_t>(offset));
    std::memcpy(arena_.data() + offset + count, key, len);
    ++size_;
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t offset = 0;  // entry start in arena_
    uint16_t key_len = 0;
    uint16_t n_ids = 0;
  };

  void place(const Slot& s) {
    size_t i = s.hash >> shift_;
    while (slots_[i].hash != 0) i = (i + 1) & mask_;
    slots_[i] = s;
  }

  void resize(size_t capacity) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    shift_ = 64;
    for (size_t c = capacity; c > 1; c >>= 1) --shift_;
    for (const Slot& s : old) {
      if (s.hash != 0) place(s);
    }
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 64;
  size_t size_ = 0;
  std::vector<int32_t> arena_;
};

// A merge rule: the pair (left, right) of symbol ids becomes piece `id`.
struct Merge {
  int32_t id = -1;
  float score = 0.0f;
};

// A BPE symbol on the general (heap) path: a doubly linked list over the text.
struct Symbol {
  int32_t id;  // symbol id (see BpeModel), -1 for a character in no piece;
               // a frozen symbol holds its piece id
  int32_t prev;
  int32_t next;
  uint32_t start;  // byte range in the normalized text; len 0 = merged away
  uint32_t len;
  bool frozen;  // a user-defined piece
};

// A candidate merge. The heap's top is the highest score, then the leftmost
// pair, which is SentencePiece's order.
struct Candidate {
  float score;
  int32_t left;
  int32_t right;
  uint32_t size;  // byte length of the merged string, to detect stale entries
  int32_t merged;
};

struct CandidateLess {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};

// Segments up to this many characters run the array-based merge loop, which
// beats the heap on short input; longer ones use the heap.
constexpr size_t kSmallSymbols = 64;

}  // namespace

// Scratch space of one encode call; leased from the Tokenizer's pool. Aligned
// to a cache line so that two threads' workspaces never share one.
struct alignas(64) Workspace {
  std::string normalized;
  // Array path.
  std::vector<int32_t> sym_id;
  std::vector<uint32_t> sym_start;
  std::vector<uint32_t> sym_len;
  std::vector<int32_t> pair_id;
  std::vector<float> pair_score;
  // Heap path.
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
  // UNUSED piece -> the (left, right) symbol ids it was last proposed from;
  // SentencePiece splits unused pieces back along these.
  std::unordered_map<int32_t, std::pair<int32_t, int32_t>> rev_merge;
  std::vector<int32_t> segment_ids;
  SegmentCache cache;

  // Frees scratch buffers that a huge input grew past `limit` elements, so that
  // an idle workspace does not keep holding that memory.
  void trim(size_t limit) {
    auto shrink = [limit](auto& buffer) {
      if (buffer.capacity() > limit) std::decay_t<decltype(buffer)>().swap(buffer);
    };
    shrink(normalized);
    shrink(sym_id);
    shrink(sym_start);
    shrink(sym_len);
    shrink(pair_id);
    shrink(pair_score);
    shrink(symbols);
    shrink(heap);
  }
};

// Scratch buffers above this many elements are freed after each text.
constexpr size_t kMaxIdleScratch = size_t{1} << 20;

// ---------------------------------------------------------------------------

class Normalizer {
 public:
  Normalizer(const spm::NormalizerSpec& spec, bool whitespace_as_suffix,
             const SymbolMatcher* user_symbols, const std::string& origin)
      : add_dummy_prefix_(spec.add_dummy_prefix),
        remove_extra_whitespaces_(spec.remove_extra_whitespaces),
        escape_whitespaces_(spec.escape_whitespaces),
        whitespace_as_suffix_(whitespace_as_suffix),
        user_symbols_(user_symbols && !user_symbols->empty() ? user_symbols : nullptr) {
    if (!spec.precompiled_charsmap.empty()) {
      charsmap_ = std::make_unique<CharsMap>(spec.precompiled_charsmap, origin);
    }
    // Without a charsmap and without whitespace folding, a user-defined piece
    // normalizes exactly like its characters one by one (when it is valid
    // UTF-8), so a plain byte loop gives the same output.
    identity_fast_ = !charsmap_ && !remove_extra_whitespaces_ && escape_whitespaces_ &&
                     (!user_symbols_ || user_symbols_->all_valid_utf8());
  }

  // `dummy_prefix` off leaves out the model's dummy prefix (or suffix) for this text.
  void normalize(std::string_view in, std::string& out, bool dummy_prefix = true) const {
    out.clear();
    if (in.empty()) return;
    const bool dummy = add_dummy_prefix_ && dummy_prefix;
    if (identity_fast_) {
      normalize_identity(in, dummy, out);
    } else {
      normalize_general(in, dummy, out);
    }
  }

 private:
  // The next normalization unit at s: a user-defined piece, the longest
  // charsmap rule, or one character (one byte -> U+FFFD when malformed).
  // Returns the bytes consumed and sets `rep` to what they become.
  size_t next_unit(const char* s, size_t n, std::string_view& rep) const {
    if (user_symbols_ && user_symbols_->may_start(static_cast<unsigned char>(s[0]))) {
      int32_t id;
      const size_t len = user_symbols_->longest_match(s, n, id);
      if (len > 0) {
        rep = std::string_view(s, len);
        return len;
      }
    }
    if (charsmap_) {
      const size_t len = charsmap_->longest_match(s, n, rep);
      if (len > 0) return len;
    }
    const size_t len = valid_char_len(bytes_of(s), n);
    if (len == 0) {
      rep = kReplacementChar;
      return 1;
    }
    rep = std::string_view(s, len);
    return len;
  }

  void normalize_identity(std::string_view in, bool dummy, std::string& out) const {
    // Worst case: every byte becomes 3 (a space or a malformed byte), plus the prefix.
    out.resize(3 * in.size() + kSpaceSymbol.size());
    char* w = out.data();
    auto put_space = [&w] {
      std::memcpy(w, kSpaceSymbol.data(), 3);
      w += 3;
    };
    if (dummy && !whitespace_as_suffix_) put_space();
    const char* s = in.data();
    const size_t n = in.size();
    for (size_t i = 0; i < n;) {
      const unsigned char c = static_cast<unsigned char>(s[i]);
      if (c == ' ') {
        put_space();
        ++i;
      } else if (c < 0x80) {
        *w++ = static_cast<char>(c);
        ++i;
      } else {
        const size_t len = valid_char_len(bytes_of(s + i), n - i);
        if (len == 0) {
          std::memcpy(w, kReplacementChar.data(), 3);
          w += 3;
          ++i;
        } else {
          std::memcpy(w, s + i, len);
          w += len;
          i += len;
        }
      }
    }
    if (dummy && whitespace_as_suffix_) put_space();
    out.resize(static_cast<size_t>(w - out.data()));
  }

  // SentencePiece's Normalizer::Normalize, step for step.
  void normalize_general(std::string_view in, bool dummy, std::string& out) const {
    const char* s = in.data();
    const size_t n = in.size();
    size_t pos = 0;
    std::string_view rep;
    if (remove_extra_whitespaces_) {  // drop leading units that normalize to " "
      while (pos < n) {
        const size_t len = next_unit(s + pos, n - pos, rep);
        if (rep != " ") break;
        pos += len;
      }
      if (pos == n) return;
    }
    out.reserve(3 * (n - pos) + kSpaceSymbol.size());
    const std::string_view space = escape_whitespaces_ ? kSpaceSymbol : std::string_view(" ");
    if (dummy && !whitespace_as_suffix_) out.append(space);

    bool prev_space = remove_extra_whitespaces_;
    while (pos < n) {
      const size_t len = next_unit(s + pos, n - pos, rep);
      while (prev_space && !rep.empty() && rep.front() == ' ') rep.remove_prefix(1);
      if (!rep.empty()) {
        for (const char ch : rep) {
          if (ch == ' ' && escape_whitespaces_) {
            out.append(kSpaceSymbol);
          } else {
            out.push_back(ch);
          }
        }
        prev_space = rep.back() == ' ';
      }
      pos += len;
      if (!remove_extra_whitespaces_) prev_space = false;
    }
    if (remove_extra_whitespaces_) {
      while (out.size() >= space.size() &&
             std::string_view(out).substr(out.size() - space.size()) == space) {
        out.resize(out.size() - space.size());
      }
    }
    if (dummy && whitespace_as_suffix_) out.append(space);
  }

  bool add_dummy_prefix_;
  bool remove_extra_whitespaces_;
  bool escape_whitespaces_;
  bool whitespace_as_suffix_;
  const SymbolMatcher* user_symbols_;
  std::unique_ptr<CharsMap> charsmap_;
  bool identity_fast_ = false;
};

// ---------------------------------------------------------------------------
// BPE over symbol ids.
//
// Symbol ids: a symbol's string is always either one character or a piece
// that a merge produced (SentencePiece only merges into pieces it knows), so
// symbols are numbered by piece id, and the characters that occur in some
// piece without being pieces themselves get ids from vocab_size up. Merges
// become a hash lookup on (left id, right id) instead of a string lookup.
//
// SegmentRule. Say the normalized text is split between adjacent characters x
// and y. A merge across that point would create a piece whose characters
// include x immediately followed by y. So if no piece that merges can create
// contains the bigram xy, no merge ever crosses the point, no candidate pair
// spans it, and SentencePiece's global merge order, restricted to either side,
// is exactly the order that side would follow on its own (scores are per
// pair; ties go to the leftmost pair on both counts). Encoding the two sides
// separately and concatenating is therefore identical to encoding the whole.
// At load time every adjacent character pair of every NORMAL (or UNUSED)
// piece is marked unsafe; all other boundaries split. Llama-2's vocabulary
// has pieces made of "▁▁", "▁▁▁▁", ... so "▁▁" is unsafe while "x▁" is safe
// for any other x: a run of spaces stays attached to the word after it.
// Boundaries next to a user-defined piece always split (frozen symbols never
// merge).
//
// UNUSED pieces turn the segmentation off (the model then runs whole-text
// BPE, still exact): SentencePiece splits a merged unused piece back along the
// pair it last proposed for that piece anywhere in the text, which no segment
// can know. With byte_fallback off, adjacent unknown characters collapse into
// one <unk> even across segments; emit_segment() joins such runs.
class BpeModel {
 public:
  BpeModel(const spm::ModelProto& model, const std::string& origin)
      : pieces_(model.pieces), byte_fallback_(model.trainer_spec.byte_fallback) {
    const int32_t n = static_cast<int32_t>(pieces_.size());
    validate_and_index(model, origin);

    // Symbol ids of single characters: NORMAL/UNUSED single-character pieces.
    ascii_ids_.fill(-1);
    for (int32_t id = 0; id < n; ++id) {
      const spm::Piece& p = pieces_[id];
      if (!mergeable(p.type)) continue;
      const size_t len = std::min(one_char_len(static_cast<uint8_t>(p.text[0])), p.text.size());
      if (len == p.text.size()) set_char_id(p.text.data(), len, id);
    }

    // Merge rules: every split of every mergeable piece into two symbol strings.
    std::vector<size_t> cuts;
    for (int32_t id = 0; id < n; ++id) {
      const spm::Piece& p = pieces_[id];
      if (!mergeable(p.type)) continue;
      char_boundaries(p.text, cuts);
      if (cuts.size() < 3) continue;  // a single character
      for (size_t k = 1; k + 1 < cuts.size(); ++k) {
        const std::string_view left = std::string_view(p.text).substr(0, cuts[k]);
        const std::string_view right = std::string_view(p.text).substr(cuts[k]);
        const int32_t l = symbol_id_for(left);
        const int32_t r = symbol_id_for(right);
        if (l < 0 || r < 0) continue;  // that side can never be a symbol
        merges_.insert_or_assign(merge_key(l, r), Merge{id, p.score});
      }
      // Segmentation rule: this piece's adjacent characters may not be split.
      for (size_t k = 1; k + 1 < cuts.size(); ++k) {
        mark_unsafe(p.text.data() + cuts[k - 1], cuts[k] - cuts[k - 1], p.text.data() + cuts[k],
                    cuts[k + 1] - cuts[k]);
      }
    }
    segmented_ = !has_unused_;
  }

  int32_t size() const { return static_cast<int32_t>(pieces_.size()); }
  PieceType type(int32_t id) const { return pieces_[id].type; }
  const std::string& piece(int32_t id) const { return pieces_[id].text; }
  int32_t unk_index() const { return unk_id_; }
  bool segmented() const { return segmented_; }
  const SymbolMatcher& user_symbols() const { return user_symbols_; }
  uint8_t byte_value(int32_t id) const { return byte_value_[id]; }

  // Id of `text` among all pieces, -1 when absent.
  int32_t find_piece(std::string_view text) const {
    const auto it = all_pieces_.find(text);
    return it == all_pieces_.end() ? -1 : it->second;
  }

  // Appends the ids of a normalized text to `out`. With `match_user_defined` off, the
  // user-defined pieces are not looked for and their characters run through BPE like any
  // other text.
  void encode(std::string_view text, bool match_user_defined, Workspace& ws,
              std::vector<int32_t>& out) const {
    if (text.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
      throw std::length_error("text is too long to encode: " + std::to_string(text.size()) +
                              " normalized bytes (limit 2147483647)");
    }
    const size_t out_start = out.size();
    if (segmented_) {
      encode_segmented(text.data(), text.size(), match_user_defined, ws, out, out_start);
    } else {
      encode_whole(text.data(), text.size(), match_user_defined, ws, out, out_start);
    }
  }

 private:
  static bool mergeable(PieceType t) { return t == PieceType::kNormal || t == PieceType::kUnused; }

  static uint64_t merge_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  // Offsets of the character boundaries of s, 0 and s.size() included.
  static void char_boundaries(std::string_view s, std::vector<size_t>& cuts) {
    cuts.clear();
    size_t i = 0;
    cuts.push_back(0);
    while (i < s.size()) {
      i += std::min(one_char_len(static_cast<uint8_t>(s[i])), s.size() - i);
      cuts.push_back(i);
    }
  }

  // Symbols are indexed 0..127 for ASCII and 128 for U+2581 in the dense table
  // of safe boundaries; -1 for everything else.
  static int small_class(const char* s, size_t len) {
    if (len == 1 && static_cast<uint8_t>(s[0]) < 0x80) return static_cast<uint8_t>(s[0]);
    if (len == 3 && is_space_symbol(s, 3)) return 128;
    return -1;
  }

  static uint64_t pair_key(uint64_t a, uint64_t b) {
    // Lossy on purpose: a collision only marks one more boundary unsafe.
    const uint64_t k = mix64(a * 0x9E3779B97F4A7C15ull + b);
    return k == ~uint64_t{0} ? 0 : k;
  }

  void mark_unsafe(const char* a, size_t a_len, const char* b, size_t b_len) {
    const int ca = small_class(a, a_len), cb = small_class(b, b_len);
    if (ca >= 0 && cb >= 0) {
      small_unsafe_[ca * 129 + cb] = true;
    } else {
      unsafe_pairs_.insert_or_assign(pair_key(char_key(a, a_len), char_key(b, b_len)), true);
    }
  }

  bool boundary_safe(int class_a, const char* a, size_t a_len, int class_b, const char* b,
                     size_t b_len) const {
    if (class_a >= 0 && class_b >= 0) return !small_unsafe_[class_a * 129 + class_b];
    return unsafe_pairs_.find(pair_key(char_key(a, a_len), char_key(b, b_len))) == nullptr;
  }

  void set_char_id(const char* s, size_t len, int32_t id) {
    if (len == 1 && static_cast<uint8_t>(s[0]) < 0x80) {
      ascii_ids_[static_cast<uint8_t>(s[0])] = id;
    } else {
      char_ids_.insert_or_assign(char_key(s, len), id);
    }
  }

  int32_t char_id(const char* s, size_t len) const {
    if (len == 1 && static_cast<uint8_t>(s[0]) < 0x80)
      return ascii_ids_[static_cast<uint8_t>(s[0])];
    const int32_t* id = char_ids_.find(char_key(s, len));
    return id ? *id : -1;
  }

  // The symbol id a split side `s` would have, or -1 if no symbol can have that
  // string; characters that are not pieces get new ids here.
  int32_t symbol_id_for(std::string_view s) {
    const auto it = mergeable_.find(s);
    if (it != mergeable_.end()) return it->second;
    const size_t first = std::min(one_char_len(static_cast<uint8_t>(s[0])), s.size());
    if (first != s.size()) return -1;  // several characters yet not a piece
    const auto user = all_pieces_.find(s);
    if (user != all_pieces_.end() && pieces_[user->second].type == PieceType::kUserDefined) {
      return -1;  // the matcher freezes this character wherever it occurs
    }
    const int32_t existing = char_id(s.data(), s.size());
    if (existing >= 0) return existing;
    const int32_t id = size() + static_cast<int32_t>(extra_chars_.size());
    extra_chars_.emplace_back(s);
    set_char_id(s.data(), s.size(), id);
    return id;
  }

  int32_t symbol_length(int32_t id) const {
    return static_cast<int32_t>(id < size() ? pieces_[id].text.size()
                                            : extra_chars_[id - size()].size());
  }

  const Merge* find_merge(int32_t left, int32_t right) const {
    return merges_.find(merge_key(left, right));
  }

  void validate_and_index(const spm::ModelProto& model, const std::string& origin) {
    if (!model.has_trainer_spec) {
      // The type then defaults to UNIGRAM; a BPE file cut short after its pieces looks like this.
      throw std::invalid_argument(
          origin +
          ": the model has no trainer_spec, so its type is UNIGRAM by default "
          "(is the file truncated?); only BPE models are supported");
    }
    if (model.trainer_spec.model_type != spm::ModelType::kBpe) {
      throw std::invalid_argument(origin + ": the tokenizer model type is " +
                                  spm::model_type_name(model.trainer_spec.model_type) +
                                  "; only BPE models are supported");
    }
    bool byte_seen[256] = {};
    byte_value_.assign(pieces_.size(), 0);
    for (int32_t id = 0; id < size(); ++id) {
      const spm::Piece& p = pieces_[id];
      const std::string where = origin + ": piece " + std::to_string(id);
      if (p.text.empty()) throw std::invalid_argument(where + " is empty");
      if (p.text.size() >= kMaxPieceBytes) {
        throw std::invalid_argument(where + " is " + std::to_string(p.text.size()) +
                                    " bytes long (the limit is " +
                                    std::to_string(kMaxPieceBytes - 1) + ")");
      }
      if (p.text.find('\0') != std::string::npos)
        throw std::invalid_argument(where + " contains a NUL byte");
      if (!all_pieces_.emplace(p.text, id).second) {
        throw std::invalid_argument(where + " ('" + p.text + "') duplicates piece " +
                                    std::to_string(all_pieces_.at(p.text)));
      }
      switch (p.type) {
        case PieceType::kNormal:
          mergeable_.emplace(p.text, id);
          break;
        case PieceType::kUnused:
          mergeable_.emplace(p.text, id);
          has_unused_ = true;
          break;
        case PieceType::kUserDefined:
          user_symbols_.add(p.text, id);
          break;
        case PieceType::kUnknown:
          if (unk_id_ >= 0) {
            throw std::invalid_argument(where + " is a second unknown piece (the first is " +
                                        std::to_string(unk_id_) + ")");
          }
          unk_id_ = id;
          break;
        case PieceType::kControl: {
          // A one-character control piece shadows that character for
          // SentencePiece, which then fails to encode text containing it alone.
          const size_t len = std::min(one_char_len(static_cast<uint8_t>(p.text[0])), p.text.size());
          if (len == p.text.size())
            control_chars_.insert_or_assign(char_key(p.text.data(), len), id);
          break;
        }
        case PieceType::kByte: {
          if (!model.trainer_spec.byte_fallback) {
            throw std::invalid_argument(where + " is the byte piece '" + p.text +
                                        "' but the model has byte_fallback off");
          }
          const int value = parse_byte_piece(p.text);
          if (value < 0)
            throw std::invalid_argument(where + " is an invalid byte piece '" + p.text + "'");
          byte_seen[value] = true;
          byte_ids_[value] = id;
          byte_value_[id] = static_cast<uint8_t>(value);
          break;
        }
      }
    }
    if (unk_id_ < 0) throw std::invalid_argument(origin + ": the model defines no unknown piece");
    if (byte_fallback_ &&
        std::find(std::begin(byte_seen), std::end(byte_seen), false) != std::end(byte_seen)) {
      throw std::invalid_argument(
          origin + ": byte_fallback is on but the model lacks some of the 256 byte pieces");
    }
  }

  // "<0x4A>" -> 0x4A; -1 unless the piece has exactly that form (upper-case hex).
  static int parse_byte_piece(const std::string& s) {
    if (s.size() != 6 || s.compare(0, 3, "<0x") != 0 || s[5] != '>') return -1;
    int value = 0;
    for (int i = 3; i < 5; ++i) {
      const char c = s[i];
      value <<= 4;
      if (c >= '0' && c <= '9') {
        value |= c - '0';
      } else if (c >= 'A' && c <= 'F') {
        value |= c - 'A' + 10;
      } else {
        return -1;
      }
    }
    return value;
  }

  // ---- encoding ----

  // Splits at every safe boundary (see SegmentRule) and encodes the segments,
  // through the cache when short. A segment's ids depend on its bytes alone, never on
  // `match_user_defined` (which only decides where user-defined pieces are cut out), so
  // both modes share one cache.
  void encode_segmented(const char* s, size_t n, bool match_user_defined, Workspace& ws,
                        std::vector<int32_t>& out, size_t out_start) const {
    // Segments are emitted one step late: when the scan finds a segment, it
    // prefetches that segment's cache slot and emits the previous one, so the
    // slot's cache miss overlaps with scanning.
    const char* pending = nullptr;
    size_t pending_len = 0;
    uint64_t pending_hash = 0;
    auto push = [&](const char* seg_start, size_t seg_len) {
      const uint64_t hash =
          seg_len <= SegmentCache::kMaxKeyBytes ? hash_bytes(seg_start, seg_len) | 1 : 0;
      if (hash) ws.cache.prefetch(hash);
      if (pending) emit_segment(pending, pending_len, pending_hash, ws, out, out_start);
      pending = seg_start;
      pending_len = seg_len;
      pending_hash = hash;
    };
    const bool has_user = match_user_defined && !user_symbols_.empty();
    size_t seg = 0;       // start of the current segment
    size_t prev = 0;      // start of the previous character
    size_t prev_len = 0;  // its length
    int prev_class = -1;
    for (size_t i = 0; i < n;) {
      const unsigned char c = static_cast<unsigned char>(s[i]);
      if (has_user && user_symbols_.may_start(c)) {
        int32_t id;
        const size_t len = user_symbols_.longest_match(s + i, n - i, id);
        if (len > 0) {
          if (i > seg) push(s + seg, i - seg);
          if (pending) emit_segment(pending, pending_len, pending_hash, ws, out, out_start);
          pending = nullptr;
          out.push_back(id);
          i += len;
          seg = i;
          continue;
        }
      }
      size_t len;
      int cls;
      if (c < 0x80) {
        len = 1;
        cls = c;
      } else {
        len = std::min(one_char_len(c), n - i);
        cls = (len == 3 && is_space_symbol(s + i, 3)) ? 128 : -1;
      }
      if (i > seg && boundary_safe(prev_class, s + prev, prev_len, cls, s + i, len)) {
        push(s + seg, i - seg);
        seg = i;
      }
      prev = i;
      prev_len = len;
      prev_class = cls;
      i += len;
    }
    if (n > seg) push(s + seg, n - seg);
    if (pending) emit_segment(pending, pending_len, pending_hash, ws, out, out_start);
  }

  // Appends the ids of one segment; `hash` is its cache hash, 0 when it is too
  // long to cache.
  void emit_segment(const char* s, size_t n, uint64_t hash, Workspace& ws,
                    std::vector<int32_t>& out, size_t out_start) const {
    if (hash == 0) {
      encode_plain(s, n, ws, out, out_start);
      return;
    }
    size_t count = 0;
    const int32_t* ids = ws.cache.find(s, n, hash, count);
    if (!ids) {
      ws.segment_ids.clear();
      encode_plain(s, n, ws, ws.segment_ids, 0);
      ws.cache.insert(s, n, hash, ws.segment_ids.data(), ws.segment_ids.size());
      ids = ws.segment_ids.data();
      count = ws.segment_ids.size();
    }
    // A run of unknown characters is one <unk> even across segments.
    if (!byte_fallback_ && count > 0 && ids[0] == unk_id_ && out.size() > out_start &&
        out.back() == unk_id_) {
      ++ids;
      --count;
    }
    out.insert(out.end(), ids, ids + count);
  }

  // BPE on text without user-defined pieces.
  void encode_plain(const char* s, size_t n, Workspace& ws, std::vector<int32_t>& out,
                    size_t out_start) const {
    if (ws.sym_id.size() < n) {
      ws.sym_id.resize(n);
      ws.sym_start.resize(n);
      ws.sym_len.resize(n);
      ws.pair_id.resize(n);
      ws.pair_score.resize(n);
    }
    int32_t* id = ws.sym_id.data();
    uint32_t* start = ws.sym_start.data();
    uint32_t* len = ws.sym_len.data();
    size_t count = 0;
    for (size_t i = 0; i < n;) {
      const size_t l = std::min(one_char_len(static_cast<uint8_t>(s[i])), n - i);
      id[count] = char_id(s + i, l);
      start[count] = static_cast<uint32_t>(i);
      len[count] = static_cast<uint32_t>(l);
      ++count;
      i += l;
    }
    if (count <= kSmallSymbols) {
      count = merge_small(ws, count);
      for (size_t k = 0; k < count; ++k)
        emit_symbol(id[k], s + start[k], len[k], ws, out, out_start);
      return;
    }
    ws.symbols.resize(count);
    for (size_t k = 0; k < count; ++k) {
      ws.symbols[k] = Symbol{id[k],
                             static_cast<int32_t>(k) - 1,
                             k + 1 < count ? static_cast<int32_t>(k + 1) : -1,
                             start[k],
                             len[k],
                             false};
    }
    merge_heap(ws, false);
    for (int32_t k = 0; k >= 0; k = ws.symbols[k].next) {
      const Symbol& sym = ws.symbols[k];
      emit_symbol(sym.id, s + sym.start, sym.len, ws, out, out_start);
    }
  }

  // SentencePiece's BPE on the whole text: used when segmentation is off.
  void encode_whole(const char* s, size_t n, bool match_user_defined, Workspace& ws,
                    std::vector<int32_t>& out, size_t out_start) const {
    std::vector<Symbol>& syms = ws.symbols;
    syms.clear();
    const bool has_user = match_user_defined && !user_symbols_.empty();
    for (size_t i = 0; i < n;) {
      const int32_t k = static_cast<int32_t>(syms.size());
      int32_t user_id;
      size_t user_len = 0;
      if (has_user && user_symbols_.may_start(static_cast<unsigned char>(s[i]))) {
        user_len = user_symbols_.longest_match(s + i, n - i, user_id);
      }
      if (user_len > 0) {
        syms.push_back(Symbol{user_id, k - 1, k + 1, static_cast<uint32_t>(i),
                              static_cast<uint32_t>(user_len), true});
        i += user_len;
      } else {
        const size_t l = std::min(one_char_len(static_cast<uint8_t>(s[i])), n - i);
        syms.push_back(Symbol{char_id(s + i, l), k - 1, k + 1, static_cast<uint32_t>(i),
                              static_cast<uint32_t>(l), false});
        i += l;
      }
    }
    if (syms.empty()) return;
    syms.back().next = -1;
    ws.rev_merge.clear();
    merge_heap(ws, has_unused_);
    for (int32_t k = 0; k >= 0; k = syms[k].next) {
      const Symbol& sym = syms[k];
      if (sym.frozen) {
        out.push_back(sym.id);
      } else {
        emit_symbol(sym.id, s + sym.start, sym.len, ws, out, out_start);
      }
    }
  }

  // Array-based merge loop over ws.sym_* [0, count): repeatedly merges the
  // best pair (highest score, leftmost). Returns the final symbol count.
  size_t merge_small(Workspace& ws, size_t count) const {
    int32_t* id = ws.sym_id.data();
    uint32_t* start = ws.sym_start.data();
    uint32_t* len = ws.sym_len.data();
    int32_t* pid = ws.pair_id.data();
    float* pscore = ws.pair_score.data();
    auto lookup = [&](size_t i) {
      pid[i] = -1;
      if (id[i] < 0 || id[i + 1] < 0) return;
      if (const Merge* m = find_merge(id[i], id[i + 1])) {
        pid[i] = m->id;
        pscore[i] = m->score;
      }
    };
    for (size_t i = 0; i + 1 < count; ++i) lookup(i);
    while (count > 1) {
      size_t best = count;
      float best_score = 0.0f;
      for (size_t i = 0; i + 1 < count; ++i) {
        if (pid[i] >= 0 && (best == count || pscore[i] > best_score)) {
          best = i;
          best_score = pscore[i];
        }
      }
      if (best == count) break;
      id[best] = pid[best];
      len[best] += len[best + 1];
      for (size_t j = best + 1; j + 1 < count; ++j) {
        id[j] = id[j + 1];
        start[j] = start[j + 1];
        len[j] = len[j + 1];
      }
      for (size_t j = best + 1; j + 2 < count; ++j) {
        pid[j] = pid[j + 1];
        pscore[j] = pscore[j + 1];
      }
      --count;
      if (best > 0) lookup(best - 1);
      if (best + 1 < count) lookup(best);
    }
    return count;
  }

  // Heap-based merge loop over ws.symbols, as SentencePiece runs it. With
  // `record_unused`, remembers for each UNUSED piece the pair it was last
  // proposed from.
  void merge_heap(Workspace& ws, bool record_unused) const {
    std::vector<Symbol>& syms = ws.symbols;
    std::vector<Candidate>& heap = ws.heap;
    heap.clear();
    auto propose = [&](int32_t left, int32_t right) {
      if (left < 0 || right < 0) return;
      const Symbol& a = syms[left];
      const Symbol& b = syms[right];
      if (a.frozen || b.frozen || a.id < 0 || b.id < 0) return;
      const Merge* m = find_merge(a.id, b.id);
      if (!m) return;
      heap.push_back(Candidate{m->score, left, right, a.len + b.len, m->id});
      std::push_heap(heap.begin(), heap.end(), CandidateLess{});
      if (record_unused && pieces_[m->id].type == PieceType::kUnused)
        ws.rev_merge[m->id] = {a.id, b.id};
    };
    for (int32_t k = 1; k < static_cast<int32_t>(syms.size()); ++k) propose(k - 1, k);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), CandidateLess{});
      const Candidate top = heap.back();
      heap.pop_back();
      Symbol& a = syms[top.left];
      Symbol& b = syms[top.right];
      // Stale: one side was merged away, or the right side grew since.
      if (a.len == 0 || b.len == 0 || a.len + b.len != top.size) continue;
      a.id = top.merged;
      a.len += b.len;
      a.next = b.next;
      if (b.next >= 0) syms[b.next].prev = top.left;
      b.len = 0;
      propose(a.prev, top.left);
      propose(top.left, a.next);
    }
  }

  // Output for one final symbol with the given id and bytes.
  void emit_symbol(int32_t id, const char* bytes, size_t len, const Workspace& ws,
                   std::vector<int32_t>& out, size_t out_start) const {
    if (id >= 0 && id < size()) {
      if (!has_unused_ || pieces_[id].type != PieceType::kUnused) {
        out.push_back(id);
        return;
      }
      // An UNUSED piece goes back to the pair it was merged from; one that was
      // not merged (a single character) is unknown, as in SentencePiece.
      const auto it = ws.rev_merge.find(id);
      if (it != ws.rev_merge.end()) {
        const size_t left_len = static_cast<size_t>(symbol_length(it->second.first));
        emit_symbol(it->second.first, bytes, left_len, ws, out, out_start);
        emit_symbol(it->second.second, bytes + left_len, len - left_len, ws, out, out_start);
        return;
      }
    }
    // A character that is not a piece (or an unused one).
    if (!control_chars_.empty() && control_chars_.find(char_key(bytes, len))) {
      throw std::invalid_argument("the text contains '" + std::string(bytes, len) +
                                  "', which this model defines as a control piece; SentencePiece "
                                  "cannot encode it either");
    }
    if (byte_fallback_) {
      for (size_t i = 0; i < len; ++i) out.push_back(byte_ids_[static_cast<uint8_t>(bytes[i])]);
    } else if (!(out.size() > out_start && out.back() == unk_id_)) {
      out.push_back(unk_id_);
    }
  }

  const std::vector<spm::Piece>& pieces_;
  bool byte_fallback_;
  int32_t unk_id_ = -1;
  bool has_unused_ = false;
  bool segmented_ = false;
  std::unordered_map<std::string_view, int32_t> all_pieces_;
  std::unordered_map<std::string_view, int32_t> mergeable_;  // NORMAL and UNUSED
  SymbolMatcher user_symbols_;
  FlatMap<int32_t> control_chars_;
  std::array<int32_t, 256> byte_ids_{};
  std::vector<uint8_t> byte_value_;  // piece id -> byte, for byte pieces
  std::array<int32_t, 128> ascii_ids_{};
  FlatMap<int32_t> char_ids_;
  std::vector<std::string> extra_chars_;  // symbol id size() + i -> its character
  FlatMap<Merge> merges_;
  bool small_unsafe_[129 * 129] = {};
  FlatMap<bool> unsafe_pairs_;
};

// ---------------------------------------------------------------------------

class Tokenizer::WorkspaceLease {
 public:
  explicit WorkspaceLease(const Tokenizer& owner) : owner_(owner) {
    {
      std::lock_guard<std::mutex> lock(owner_.pool_mutex_);
      if (!owner_.pool_.empty()) {
        ws_ = std::move(owner_.pool_.back());
        owner_.pool_.pop_back();
      }
    }
    if (!ws_) ws_ = std::make_unique<Workspace>();
  }
  ~WorkspaceLease() {
    std::lock_guard<std::mutex> lock(owner_.pool_mutex_);
    owner_.pool_.push_back(std::move(ws_));
  }
  WorkspaceLease(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(const WorkspaceLease&) = delete;
  Workspace& operator*() { return *ws_; }

 private:
  const Tokenizer& owner_;
  std::unique_ptr<Workspace> ws_;
};

Tokenizer::Tokenizer(const std::string& path) : path_(path), model_(spm::load_model_proto(path)) {
  bpe_ = std::make_unique<BpeModel>(model_, path_);
  normalizer_ = std::make_unique<Normalizer>(model_.normalizer_spec,
                                             model_.trainer_spec.treat_whitespace_as_suffix,
                                             &bpe_->user_symbols(), path_);
  text_normalizer_ = std::make_unique<Normalizer>(
      model_.normalizer_spec, model_.trainer_spec.treat_whitespace_as_suffix, nullptr, path_);
  if (model_.has_denormalizer_spec && !model_.denormalizer_spec.precompiled_charsmap.empty()) {
    denormalizer_ = std::make_unique<Normalizer>(model_.denormalizer_spec, false, nullptr, path_);
  }
  // SentencePiece's rules: unk_id is the unknown piece; bos/eos/pad are their
  // pieces when those are control pieces, else -1.
  const spm::TrainerSpec& ts = model_.trainer_spec;
  const int32_t unk = bpe_->find_piece(ts.unk_piece);
  unk_id_ = unk < 0 ? bpe_->unk_index() : (bpe_->type(unk) == PieceType::kUnknown ? unk : -1);
  auto control_id = [&](const std::string& piece) {
    const int32_t id = bpe_->find_piece(piece);
    return id >= 0 && bpe_->type(id) == PieceType::kControl ? id : -1;
  };
  bos_id_ = control_id(ts.bos_piece);
  eos_id_ = control_id(ts.eos_piece);
  pad_id_ = control_id(ts.pad_piece);
}

Tokenizer::~Tokenizer() = default;

int Tokenizer::vocab_size() const { return bpe_->size(); }
bool Tokenizer::segmented() const { return bpe_->segmented(); }

int Tokenizer::piece_to_id(std::string_view piece) const {
  const int32_t id = bpe_->find_piece(piece);
  return id >= 0 ? id : bpe_->unk_index();
}

const std::string& Tokenizer::id_to_piece(int id) const {
  if (id < 0 || id >= bpe_->size()) {
    throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary (size " +
                            std::to_string(bpe_->size()) + ")");
  }
  return bpe_->piece(id);
}

std::string Tokenizer::normalize(std::string_view text, EncodeOptions options) const {
  std::string out;
  (options.allow_special ? normalizer_ : text_normalizer_)
      ->normalize(text, out, options.add_dummy_prefix);
  return out;
}

void Tokenizer::encode_with(std::string_view text, EncodeOptions options, Workspace& ws,
                            std::vector<int32_t>& out) const {
  (options.allow_special ? normalizer_ : text_normalizer_)
      ->normalize(text, ws.normalized, options.add_dummy_prefix);
  bpe_->encode(ws.normalized, options.allow_special, ws, out);
  ws.trim(kMaxIdleScratch);
}

void Tokenizer::encode(std::string_view text, std::vector<int32_t>& out,
                       EncodeOptions options) const {
  WorkspaceLease ws(*this);
  encode_with(text, options, *ws, out);
}

namespace {

// Runs worker(failed) on `threads` threads, the calling one included, and
// waits for all of them. The first exception any worker throws is rethrown
// here; `failed` tells the others to stop early.
template <typename Worker>
void run_workers(size_t threads, Worker worker) {
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&] {
    try {
      worker(failed);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed = true;
    }
  };
  std::vector<std::thread> others;
  others.reserve(threads - 1);
  try {
    for (size_t t = 1; t < threads; ++t) others.emplace_back(guarded);
  } catch (...) {
    failed = true;
    for (std::thread& w : others) w.join();  // a joinable std::thread must not be destroyed
    throw;
  }
  guarded();
  for (std::thread& w : others) w.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace

EncodedBatch Tokenizer::encode_batch(const std::string_view* texts, size_t n, int num_threads,
                                     EncodeOptions options) const {
  EncodedBatch result;
  result.offsets.assign(n + 1, 0);

  // Work units are runs of consecutive texts of about `grain` bytes, several
  // per thread, handed out in order so that one slow run does not idle the rest.
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) total += texts[i].size() + 1;
  const size_t hw = std::max(1u, std::thread::hardware_concurrency());
  size_t threads = num_threads > 0 ? static_cast<size_t>(num_threads) : hw;
  const size_t grain = std::max(kBatchGrainBytes, total / (threads * 16));
  std::vector<size_t> bounds{0};
  std::vector<size_t> unit_bytes;
  size_t acc = 0;
  for (size_t i = 0; i < n; ++i) {
    acc += texts[i].size() + 1;
    if (acc >= grain || i + 1 == n) {
      bounds.push_back(i + 1);
      unit_bytes.push_back(acc);
      acc = 0;
    }
  }
  const size_t n_units = unit_bytes.size();
  threads = std::max<size_t>(1, std::min(threads, n_units));

  // Phase 1: encode each unit into its own buffer.
  std::vector<std::vector<int32_t>> chunks(n_units);
  std::atomic<size_t> next{0};
  run_workers(threads, [&](const std::atomic<bool>& failed) {
    WorkspaceLease ws(*this);
    for (size_t u = next++; u < n_units && !failed; u = next++) {
      // A local vector: the headers in `chunks` share cache lines between
      // threads, and appending to them directly makes those lines bounce.
      std::vector<int32_t> out;
      out.reserve(unit_bytes[u] / 3);  // English text runs about 4 bytes per token
      for (size_t i = bounds[u]; i < bounds[u + 1]; ++i) {
        const size_t before = out.size();
        encode_with(texts[i], options, *ws, out);
        result.offsets[i + 1] = static_cast<int64_t>(out.size() - before);
      }
      chunks[u] = std::move(out);
    }
  });
  for (size_t i = 0; i < n; ++i) result.offsets[i + 1] += result.offsets[i];

  // Phase 2: gather the buffers into one array, in parallel too.
  result.n_ids = static_cast<size_t>(result.offsets[n]);
  result.ids.reset(new int32_t[result.n_ids]);
  next = 0;
  run_workers(threads, [&](const std::atomic<bool>& failed) {
    for (size_t u = next++; u < n_units && !failed; u = next++) {
      std::copy(chunks[u].begin(), chunks[u].end(), result.ids.get() + result.offsets[bounds[u]]);
      std::vector<int32_t>().swap(chunks[u]);
    }
  });
  return result;
}

std::string Tokenizer::decode(const int64_t* ids, size_t n) const {
  const int32_t vocab = bpe_->size();
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      throw std::out_of_range("ids[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                              " is outside the vocabulary (size " + std::to_string(vocab) + ")");
    }
  }
  const spm::NormalizerSpec& ns = model_.normalizer_spec;
  const bool strip_bos_space = ns.add_dummy_prefix || ns.remove_extra_whitespaces;
  std::string text;
  std::string bytes;  // a run of byte pieces, decoded together as UTF-8
  auto flush_bytes = [&] {
    const unsigned char* b = bytes_of(bytes.data());
    for (size_t off = 0; off < bytes.size();) {
      const size_t len = valid_char_len(b + off, bytes.size() - off);
      if (len == 0) {
        text.append(kReplacementChar);  // each malformed byte becomes U+FFFD
        ++off;
      } else {
        text.append(bytes, off, len);
        off += len;
      }
    }
    bytes.clear();
  };
  // Only the first piece's leading U+2581 is the dummy prefix; with whitespace
  // folding, every leading one goes until some text has been produced.
  bool at_start = true;
  bool stripped_prefix = false;
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = static_cast<int32_t>(ids[i]);
    const PieceType type = bpe_->type(id);
    if (type == PieceType::kByte) {
      bytes.push_back(static_cast<char>(bpe_->byte_value(id)));
      continue;
    }
    flush_bytes();
    if (stripped_prefix || !text.empty()) at_start = false;
    stripped_prefix = false;
    if (type == PieceType::kControl) continue;
    if (type == PieceType::kUnknown) {
      text.append(model_.trainer_spec.unk_surface);
      continue;
    }
    std::string_view piece = bpe_->piece(id);
    if (at_start && strip_bos_space && piece.substr(0, kSpaceSymbol.size()) == kSpaceSymbol) {
      piece.remove_prefix(kSpaceSymbol.size());
      stripped_prefix = !ns.remove_extra_whitespaces;
    }
    for (size_t pos = 0; pos < piece.size();) {
      const size_t hit = piece.find(kSpaceSymbol, pos);
      if (hit == std::string_view::npos) {
        text.append(piece.substr(pos));
        break;
      }
      text.append(piece.substr(pos, hit - pos));
      text.push_back(' ');
      pos = hit + kSpaceSymbol.size();
    }
  }
  flush_bytes();
  if (denormalizer_) {
    std::string denormalized;
    denormalizer_->normalize(text, denormalized);
    return denormalized;
  }
  return text;
}

// ---------------------------------------------------------------------------
// Python bindings.

namespace py = pybind11;

namespace {

// Below this many bytes the GIL round trip costs more than it frees.
constexpr Py_ssize_t kReleaseGilBytes = 1 << 14;

// The UTF-8 bytes of a str, cached inside the str object (valid while it lives).
// `what` names the argument in the error (and is only built on failure).
template <typename Name>
std::string_view utf8_of(py::handle obj, Name what) {
  if (!PyUnicode_Check(obj.ptr())) {
    throw py::type_error(std::string(what()) + " must be str, got " + Py_TYPE(obj.ptr())->tp_name);
  }
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
  if (!data) throw py::error_already_set();
  return std::string_view(data, static_cast<size_t>(size));
}

py::list to_list(const std::vector<int32_t>& ids) {
  py::list out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    PyObject* v = PyLong_FromLong(ids[i]);
    if (!v) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), v);
  }
  return out;
}

py::list py_encode(const Tokenizer& tok, py::handle text, bool allow_special,
                   bool add_dummy_prefix) {
  const EncodeOptions options{allow_special, add_dummy_prefix};
  const std::string_view view = utf8_of(text, [] { return "text"; });
  std::vector<int32_t> ids;
  if (static_cast<Py_ssize_t>(view.size()) >= kReleaseGilBytes) {
    py::gil_scoped_release nogil;
    tok.encode(view, ids, options);
  } else {
    tok.encode(view, ids, options);
  }
  return to_list(ids);
}

py::tuple py_encode_batch(const Tokenizer& tok, py::handle texts, int num_threads,
                          bool allow_special, bool add_dummy_prefix) {
  if (num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0 (0 = all cores), got " +
                                std::to_string(num_threads));
  }
  if (PyUnicode_Check(texts.ptr()) || PyBytes_Check(texts.ptr())) {
    throw py::type_error("texts must be a sequence of str, not a single string");
  }
  // A tuple copy holds a reference to every string while the GIL is released,
  // even if the caller's list changes meanwhile.
  const py::tuple items = py::reinterpret_steal<py::tuple>(PySequence_Tuple(texts.ptr()));
  if (!items) throw py::error_already_set();
  std::vector<std::string_view> views(items.size());
  for (size_t i = 0; i < views.size(); ++i) {
    views[i] = utf8_of(items[i], [i] { return "texts[" + std::to_string(i) + "]"; });
  }
  EncodedBatch batch;
  {
    py::gil_scoped_release nogil;
    batch = tok.encode_batch(views.data(), views.size(), num_threads,
                             EncodeOptions{allow_special, add_dummy_prefix});
  }
  // The id array takes over the C++ buffer: no copy.
  py::capsule owner(batch.ids.get(), [](void* p) { delete[] static_cast<int32_t*>(p); });
  int32_t* data = batch.ids.release();
  py::array_t<int32_t> ids(static_cast<py::ssize_t>(batch.n_ids), data, owner);
  py::array_t<int64_t> offsets(static_cast<py::ssize_t>(batch.offsets.size()),
                               batch.offsets.data());
  return py::make_tuple(std::move(ids), std::move(offsets));
}

py::str py_decode(const Tokenizer& tok,
                  const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids) {
  if (ids.ndim() != 1) {
    throw std::invalid_argument("ids must be 1-D, got " + std::to_string(ids.ndim()) +
                                " dimensions");
  }
  std::string text;
  if (ids.size() >= kReleaseGilBytes) {
    py::gil_scoped_release nogil;
    text = tok.decode(ids.data(), static_cast<size_t>(ids.size()));
  } else {
    text = tok.decode(ids.data(), static_cast<size_t>(ids.size()));
  }
  return py::str(text);
}

// The settings of the model file that a converter to other formats needs.
py::dict py_model_spec(const Tokenizer& tok) {
  const spm::ModelProto& model = tok.model();
  py::list pieces(model.pieces.size());
  py::list scores(model.pieces.size());
  py::list types(model.pieces.size());
  for (size_t i = 0; i < model.pieces.size(); ++i) {
    const spm::Piece& p = model.pieces[i];
    pieces[i] = py::str(p.text);
    scores[i] = py::float_(p.score);
    types[i] = py::int_(static_cast<int>(p.type));
  }
  const spm::NormalizerSpec& ns = model.normalizer_spec;
  const spm::TrainerSpec& ts = model.trainer_spec;
  py::dict spec;
  spec["pieces"] = pieces;
  spec["scores"] = scores;
  spec["types"] = types;
  spec["byte_fallback"] = ts.byte_fallback;
  spec["treat_whitespace_as_suffix"] = ts.treat_whitespace_as_suffix;
  spec["normalizer_name"] = ns.name;
  spec["has_charsmap"] = !ns.precompiled_charsmap.empty();
  spec["add_dummy_prefix"] = ns.add_dummy_prefix;
  spec["remove_extra_whitespaces"] = ns.remove_extra_whitespaces;
  spec["escape_whitespaces"] = ns.escape_whitespaces;
  spec["has_denormalizer"] =
      model.has_denormalizer_spec && !model.denormalizer_spec.precompiled_charsmap.empty();
  return spec;
}

}  // namespace

void register_tokenizer(py::module_& m) {
  py::class_<Tokenizer>(
      m, "BpeTokenizer",
      "SentencePiece-exact BPE tokenizer over a .model file (no sentencepiece dependency).")
      .def(py::init<const std::string&>(), py::arg("model_path"),
           py::call_guard<py::gil_scoped_release>())
      .def("encode", &py_encode, py::arg("text"), py::kw_only(), py::arg("allow_special") = true,
           py::arg("add_dummy_prefix") = true,
           "Token ids of text, without BOS/EOS. allow_special=False encodes user-defined "
           "pieces written in the text as plain text; add_dummy_prefix=False leaves out the "
           "model's dummy prefix.")
      .def("encode_batch", &py_encode_batch, py::arg("texts"), py::arg("num_threads") = 0,
           py::kw_only(), py::arg("allow_special") = true, py::arg("add_dummy_prefix") = true,
           "Encodes a sequence of str on num_threads threads (0 = all cores); returns flat "
           "int32 ids and int64 offsets of length len(texts) + 1.")
      .def("decode", &py_decode, py::arg("ids"),
           "Text of a 1-D sequence of ids, as SentencePiece decodes it.")
      .def(
          "normalize",
          [](const Tokenizer& t, py::handle text, bool allow_special, bool add_dummy_prefix) {
            return t.normalize(utf8_of(text, [] { return "text"; }),
                               EncodeOptions{allow_special, add_dummy_prefix});
          },
          py::arg("text"), py::kw_only(), py::arg("allow_special") = true,
          py::arg("add_dummy_prefix") = true,
          "The normalized text BPE runs on.")
      .def(
          "piece_to_id",
          [](const Tokenizer& t, const std::string& piece) { return t.piece_to_id(piece); },
          py::arg("piece"))
      .def(
          "id_to_piece", [](const Tokenizer& t, int id) { return t.id_to_piece(id); },
          py::arg("id"))
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size)
      .def_property_readonly("unk_id", &Tokenizer::unk_id)
      .def_property_readonly("bos_id", &Tokenizer::bos_id)
      .def_property_readonly("eos_id", &Tokenizer::eos_id)
      .def_property_readonly("pad_id", &Tokenizer::pad_id)
      .def("model_spec", &py_model_spec,
           "Pieces, scores and types (SentencePiece's numbers) and the trainer and normalizer "
           "settings of the model file, as a dict.")
      .def_property_readonly("segmented", &Tokenizer::segmented,
                             "Whether encoding splits text into independently cached segments.");
}

}  // namespace agentflan::tokenizer
