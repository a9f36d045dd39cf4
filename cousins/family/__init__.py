"""The models the project builds itself and the checks of a family before a run: teacher, quantized cousins, students."""
