// FTK_CHECK: TORCH_CHECK with a message formatted without iostreams. On the H100 machine (torch
// 2.11, Ubuntu gcc 13) our extension's copy of std::ostream's number insertion crashed (SIGSEGV
// in _M_insert<long>) whenever a TORCH_CHECK message streamed a size: a clear error became a
// segfault. c10::str passes a single std::string through untouched, so no stream is built here.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace ftk::detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const at::Device& v) { s += v.str(); }

template <class... A>
std::string msg(const A&... a) {
  std::string s;
  (append(s, a), ...);
  return s;
}

}  // namespace ftk::detail

#define FTK_CHECK(cond, ...) TORCH_CHECK(cond, ::ftk::detail::msg(__VA_ARGS__))
