# find_package(engram CONFIG) for the op library of an installed engram:
#   list(APPEND CMAKE_PREFIX_PATH "$(python -c 'import engram; print(engram.cmake_prefix_path)')")
#   find_package(engram CONFIG REQUIRED)
#   target_link_libraries(app PRIVATE engram::ops)
# engram::ops brings the include directory of include/engram/*.h and LibTorch
# (found here with find_package(Torch); put torch.utils.cmake_prefix_path on
# CMAKE_PREFIX_PATH too). Linking it registers the engram:: ops in the
# dispatcher; the library links no libpython.
include(CMakeFindDependencyMacro)
find_dependency(Torch)

# This file sits in <package>/share/cmake/engram, with the library in
# <package>/lib: the Python package's layout, and the one `cmake --install`
# of the root CMakeLists.txt makes.
get_filename_component(_engram_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(_engram_library "${_engram_prefix}/lib/libengram_ops.so")
if(EXISTS "${_engram_prefix}/include/engram/runtime.h")
  set(_engram_include "${_engram_prefix}/include")
elseif(EXISTS "${_engram_prefix}/../include/engram/runtime.h")
  # An editable install: the package is the source tree's engram/.
  get_filename_component(_engram_include "${_engram_prefix}/../include" ABSOLUTE)
else()
  set(engram_FOUND FALSE)
  set(engram_NOT_FOUND_MESSAGE "engram: no include/engram/runtime.h next to ${_engram_prefix}")
  return()
endif()
if(NOT EXISTS "${_engram_library}")
  set(engram_FOUND FALSE)
  set(engram_NOT_FOUND_MESSAGE
      "engram: ${_engram_library} does not exist; build engram first (pip install --no-build-isolation -e .)")
  return()
endif()

if(NOT TARGET engram::ops)
  add_library(engram::ops SHARED IMPORTED)
  set_target_properties(engram::ops PROPERTIES
    IMPORTED_LOCATION "${_engram_library}"
    IMPORTED_SONAME "libengram_ops.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_engram_include}"
    INTERFACE_LINK_LIBRARIES "${TORCH_LIBRARIES}")
  # A program that only reaches the ops through the dispatcher references no
  # symbol of the library: keep it linked (its static initialisers register
  # the ops), as TorchConfig does for libtorch_cpu.
  set_property(TARGET engram::ops APPEND PROPERTY INTERFACE_LINK_OPTIONS "LINKER:--no-as-needed")
endif()
set(engram_INCLUDE_DIRS "${_engram_include}")
set(engram_LIBRARIES engram::ops)
