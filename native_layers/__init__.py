"""SINGA's layers as torch.autograd Functions and drop-in nn.Modules: Triton kernels on CUDA tensors, the
same math in torch ops on CPU tensors. Each module takes its torch.nn counterpart's arguments and has the
same state_dict keys."""
from .convert import convert, register_conversion
from .dispatch import use_triton
from .conv import Conv2d, conv2d
from .pool import AvgPool2d, MaxPool2d, avg_pool2d, max_pool2d
from .lrn import LRN, local_response_norm
from .linear import Linear, LinearFunction, fuse_linear_activations, linear
from .activation import Activation, ReLU, Sigmoid, Softmax, STanh, Tanh, activation, softmax
from .loss import EuclideanLoss, SoftmaxCrossEntropy, euclidean_loss, softmax_cross_entropy
from .dropout import Dropout, dropout
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from .embedding import Embedding, embedding
from .rnn import GRU, LSTM, RNN, RecurrentFunction
from .rbm import RBM, contrastive_divergence
