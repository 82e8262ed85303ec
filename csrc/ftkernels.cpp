// The one pybind11 module, ftkernels._C: registers every op and reports how it was built.
#include <torch/extension.h>

#include "ftk/autograd_host.h"
#include "ftk/lora_host.h"
#include "ftk/loreft_host.h"
#include "ftk/optimizer_host.h"

#ifndef FTK_VERSION
#define FTK_VERSION "0.0.0+unknown"
#endif
#ifndef FTK_TORCH_VERSION
#define FTK_TORCH_VERSION "unknown"
#endif
#ifndef FTK_CUDA_ARCHS
#define FTK_CUDA_ARCHS ""
#endif

namespace {

#ifdef FTK_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Ops this build serves natively, and on which devices (Python adds Triton-served ones).
py::dict native_ops() {
  py::dict ops;
  auto devices = [](bool cuda) {
    py::list l;
    l.append("cpu");
    if (cuda) l.append("cuda");
    return l;
  };
  ops["fused_optim_step"] = devices(kWithCuda);
  ops["lora_linear"] = devices(false);  // CUDA is served by Triton (ftkernels/triton)
  ops["lora_dropout"] = devices(false);
  ops["lora_mask_apply"] = devices(kWithCuda);  // the C++ LoRA node's dropout on the GEMM route
  ops["loreft"] = devices(false);
  return ops;
}

py::dict build_info() {
  py::dict d;
  d["version"] = FTK_VERSION;
  d["torch_built"] = FTK_TORCH_VERSION;
  d["cuda_compiled"] = kWithCuda;
  std::string archs = FTK_CUDA_ARCHS;
  py::list arch_list;
  size_t start = 0;
  while (start < archs.size()) {
    size_t end = archs.find_first_of("; ", start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) arch_list.append(archs.substr(start, end - start));
    start = end + 1;
  }
  d["cuda_archs"] = arch_list;
  d["native_ops"] = native_ops();
#if defined(CPU_CAPABILITY_AVX2)
  d["cpu_isa"] = "avx2";
#else
  d["cpu_isa"] = "default";
#endif
  return d;
}

std::vector<at::Tensor> fused_optim_step(const ftk::OptimArgs& args) {
  ftk::check_optim_args(args);
  if (args.params.empty()) return {};
  const at::Device dev = args.params[0].device();
  for (const auto& p : args.params)
    FTK_CHECK(p.device() == dev, "ftkernels: one fused step needs all params on one device, got ", dev, " and ",
              p.device());
  if (dev.is_cpu()) {
    ftk::fused_optim_step_cpu(args);
    return {};
  }
#ifdef FTK_WITH_CUDA
  if (dev.is_cuda()) return ftk::fused_optim_step_cuda(args);
#endif
  FTK_CHECK(false, "ftkernels: fused optimizer step has no kernel for device ", dev,
            kWithCuda ? "" : " (this build of ftkernels._C has no CUDA: rebuild with a CUDA torch and nvcc)");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ftkernels compiled kernels (CPU C++, CUDA when built)";
  m.def("build_info", &build_info, "How this extension was built: version, torch, CUDA archs, native ops");

  py::class_<ftk::OptimHyper>(m, "OptimHyper")
      .def(py::init<>())
      .def_readwrite("kind", &ftk::OptimHyper::kind)
      .def_readwrite("lr", &ftk::OptimHyper::lr)
      .def_readwrite("beta1", &ftk::OptimHyper::beta1)
      .def_readwrite("beta2", &ftk::OptimHyper::beta2)
      .def_readwrite("eps", &ftk::OptimHyper::eps)
      .def_readwrite("weight_decay", &ftk::OptimHyper::weight_decay)
      .def_readwrite("l1", &ftk::OptimHyper::l1)
      .def_readwrite("l2", &ftk::OptimHyper::l2)
      .def_readwrite("l2sp", &ftk::OptimHyper::l2sp)
      .def_readwrite("ewc", &ftk::OptimHyper::ewc)
      .def_readwrite("grad_dropout", &ftk::OptimHyper::grad_dropout)
      .def_readwrite("momentum", &ftk::OptimHyper::momentum)
      .def_readwrite("dampening", &ftk::OptimHyper::dampening)
      .def_readwrite("lr_decay", &ftk::OptimHyper::lr_decay)
      .def_readwrite("alpha", &ftk::OptimHyper::alpha)
      .def_readwrite("max_grad_norm", &ftk::OptimHyper::max_grad_norm)
      .def_readwrite("amsgrad", &ftk::OptimHyper::amsgrad)
      .def_readwrite("maximize", &ftk::OptimHyper::maximize)
      .def_readwrite("nesterov", &ftk::OptimHyper::nesterov)
      .def_readwrite("centered", &ftk::OptimHyper::centered);

  py::class_<ftk::OptimArgs>(m, "OptimArgs")
      .def(py::init<>())
      .def_readwrite("hyper", &ftk::OptimArgs::hyper)
      .def_readwrite("params", &ftk::OptimArgs::params)
      .def_readwrite("grads", &ftk::OptimArgs::grads)
      .def_readwrite("steps", &ftk::OptimArgs::steps)
      .def_readwrite("s1", &ftk::OptimArgs::s1)
      .def_readwrite("s2", &ftk::OptimArgs::s2)
      .def_readwrite("s3", &ftk::OptimArgs::s3)
      .def_readwrite("masks", &ftk::OptimArgs::masks)
      .def_readwrite("anchors", &ftk::OptimArgs::anchors)
      .def_readwrite("fishers", &ftk::OptimArgs::fishers)
      .def_readwrite("masters", &ftk::OptimArgs::masters)
      .def_readwrite("indices", &ftk::OptimArgs::indices)
      .def_readwrite("tensor_ids", &ftk::OptimArgs::tensor_ids)
      .def_readwrite("lr", &ftk::OptimArgs::lr)
      .def_readwrite("grad_scale", &ftk::OptimArgs::grad_scale)
      .def_readwrite("skip", &ftk::OptimArgs::skip)
      .def_readwrite("total_norm", &ftk::OptimArgs::total_norm)
      .def_readwrite("seed", &ftk::OptimArgs::seed)
      .def_readwrite("seed_tensor", &ftk::OptimArgs::seed_tensor);

  m.def("fused_optim_step", &fused_optim_step, py::arg("args"),
        "One fused optimizer step over all params of a group (math: ftk/optimizer.h); returns the host "
        "buffers a CUDA graph under capture reads at replay (keep them alive with the graph)",
        py::call_guard<py::gil_scoped_release>());

  m.def("lora_linear_fwd_cpu", &ftk::lora_linear_fwd_cpu, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("lora_a"), py::arg("lora_b"), py::arg("scaling"), py::arg("dropout"), py::arg("seed"),
        "Fused LoRA Linear forward on CPU: (y, u) with u = D(x) A^T, y = x W^T + b + s u B^T",
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_linear_bwd_cpu", &ftk::lora_linear_bwd_cpu, py::arg("grad"), py::arg("x"), py::arg("weight"),
        py::arg("lora_a"), py::arg("lora_b"), py::arg("u"), py::arg("scaling"), py::arg("dropout"), py::arg("seed"),
        py::arg("need_x"), py::arg("grad_x_acc") = py::none(),
        "Fused LoRA Linear backward on CPU: (grad_x, grad_A, grad_B), the mask regenerated; grad_x added into "
        "grad_x_acc when given",
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_dropout_cpu", &ftk::lora_dropout_cpu, py::arg("x"), py::arg("dropout"), py::arg("seed"),
        "D(x) of the LoRA dropout stream over x's logical [numel / K, K] view, any memory format",
        py::call_guard<py::gil_scoped_release>());
  m.def("loreft_fwd_cpu", &ftk::loreft_fwd_cpu, py::arg("h"), py::arg("rot"), py::arg("w"), py::arg("b"),
        py::arg("dropout"), py::arg("seed"), "Fused LoReFT forward on CPU: (D(h + s R), s) with s = h (W - R)^T + b",
        py::call_guard<py::gil_scoped_release>());
  m.def("loreft_bwd_cpu", &ftk::loreft_bwd_cpu, py::arg("grad"), py::arg("h"), py::arg("rot"), py::arg("w"),
        py::arg("s"), py::arg("dropout"), py::arg("seed"),
        "Fused LoReFT backward on CPU: (grad_h, grad_R, grad_W, grad_b), the mask regenerated",
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_linear_node", &ftk::lora_linear_node, py::arg("x"), py::arg("weights"), py::arg("biases"),
        py::arg("lora_as"), py::arg("lora_bs"), py::arg("bias_of"), py::arg("scalings"), py::arg("dropouts"),
        py::arg("seeds"), py::arg("kept"), py::arg("program"), py::arg("dense_cpu") = false,
        "G fused LoRA Linear layers on one x as one C++ autograd node: [y_1, ..., y_G]; x rebuilt in backward "
        "from `kept` by `program` when the program is not empty; dense_cpu runs CPU calls on the GEMM route",
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_mask_apply", &ftk::lora_mask_apply, py::arg("src"), py::arg("seed"), py::arg("dropout"),
        py::arg("scale"), py::arg("acc") = py::none(),
        "The LoRA dropout mask on a 2-D src: keep ? src * scale : 0, new or added into acc in place",
        py::call_guard<py::gil_scoped_release>());
  m.def("rebuild_input", &ftk::rebuild_input, py::arg("program"), py::arg("kept"),
        "A LoRA layer's input rebuilt from its producers' kept tensors by a postfix program "
        "(ftkernels/ops/input_recompute.py)",
        py::call_guard<py::gil_scoped_release>());
  m.def("storage_ok", &ftk::storage_ok, py::arg("t"),
        "Whether t's storage still holds every element t addresses (not released by a sharding wrapper)");
}
