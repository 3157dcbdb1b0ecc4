"""Running a model on devices: meshes and shardings, the CPU-kernel switch,
the model's variables and the predict step.

Imports core/ and models/ only; training/, evaluation/ and deploy/ build on it.
No TensorFlow here.
"""
