"""Every architecture module, imported so that their @register decorators fill the registry."""

from . import alexnet, inception, lenet, mlp, mobilenet, resnet, vgg

__all__ = ["alexnet", "inception", "lenet", "mlp", "mobilenet", "resnet", "vgg"]
