// Operator schemas of the `rela` library and the Python module init of rela_kernels._C.
//
// Every op is declared here once; backends register kernels for it in csrc/cpu (CPU key) and
// csrc/cuda/bindings.cu (CUDA key). Autograd formulas and fake (meta) kernels live in
// rela_kernels/ops.py, so torch.compile and torch.library.opcheck see one definition.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rela, m) {
  // y = (p - mean) @ matrix (+ bias), float32 [B, d].
  m.def("transport(Tensor p, Tensor mean, Tensor matrix, Tensor? bias) -> Tensor");
  // Per-row 1 - cos(z_i, y_i) as float32 [B]; when compute_grad, also d loss_i / d z_i in z's
  // dtype (the autograd backward only scales it by the incoming per-row gradient).
  m.def("cosine_loss_fwd(Tensor z, Tensor y, float eps, bool compute_grad) -> (Tensor, Tensor)");
  // cosine_loss_fwd(z, transport(p, ...)) without materialising the transported targets.
  m.def(
      "transported_cosine_loss_fwd(Tensor z, Tensor p, Tensor mean, Tensor matrix, Tensor? bias, "
      "float eps, bool compute_grad) -> (Tensor, Tensor)");
  // int64 [k]: indices of the k highest (lowest) scores, ties to the lower index, ascending.
  m.def("select_topk(Tensor scores, int k, bool largest) -> Tensor");
  // (indices [k], losses [B]): transported cosine loss of every row and their top-k, one pass.
  m.def(
      "score_and_select(Tensor z, Tensor p, Tensor mean, Tensor matrix, Tensor? bias, float eps, "
      "int k, bool largest) -> (Tensor, Tensor)");
}

extern "C" PyObject* PyInit__C(void) {
  // The module only has to exist: importing it runs the static registrations above.
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
